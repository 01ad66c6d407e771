"""The Dockerfiles, read with a small parser (no engine here): pinned bases, non-root, cached dependency layers,
one llama.cpp pin, torch matching the CUDA base, and a think-api image that has every package its code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
CODE_DIRS = {"shared", "services", "configs", "examples", "bench", "scripts"}


@dataclass
class Instruction:
    line: int
    op: str
    args: str


@dataclass
class Stage:
    base: str  # FROM, ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def ops(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]

    @property
    def args(self) -> dict[str, str]:
        return {i.args.partition("=")[0]: i.args.partition("=")[2].strip('"') for i in self.ops("ARG")}


@dataclass
class Dockerfile:
    path: Path
    arg_defaults: dict[str, str]  # ARGs declared before the first FROM (global build args)
    stages: list[Stage]
    from_raw: list[str]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def build_args(self) -> dict[str, str]:
        """Every build argument with its default: global ones and each stage's."""
        out = dict(self.arg_defaults)
        for stage in self.stages:
            out.update(stage.args)
        return out


def instructions(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (the Dockerfile grammar's basics)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append(Instruction(start, op.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation at the end of the file"
    return out


def _subst(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    from_raw: list[str] = []
    for ins in instructions(path.read_text()):
        if ins.op == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            global_args[name] = default.strip('"')
        elif ins.op == "FROM":
            from_raw.append(ins.args)
            parts = ins.args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(_subst(parts[0], global_args), name))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            raise AssertionError(f"{path.name}:{ins.line}: {ins.op} before the first FROM")
    return Dockerfile(path, global_args, stages, from_raw)


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request) -> Dockerfile:
    return parse_dockerfile(request.param)


def test_the_three_images_exist():
    assert {p.name for p in DOCKERFILES} == {"cuda.Dockerfile", "converter.Dockerfile", "think-api.Dockerfile"}


def test_parser_reads_continuations_and_comments():
    ins = instructions("# c\nFROM a:1@sha256:" + "0" * 64 + "\nRUN one \\\n  # inside\n  && two\nUSER x\n")
    assert [(i.op, i.args) for i in ins] == [("FROM", "a:1@sha256:" + "0" * 64), ("RUN", "one  && two"), ("USER", "x")]


def test_base_images_pinned_by_tag_and_digest_through_base_image_arg(dockerfile):
    assert "BASE_IMAGE" in dockerfile.arg_defaults, "a BASE_IMAGE build argument"
    assert all(raw.split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE") for raw in dockerfile.from_raw)
    for stage in dockerfile.stages:
        assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+@sha256:[0-9a-f]{64}", stage.base), stage.base
        assert ":latest@" not in stage.base


def check_non_root(df: Dockerfile) -> None:
    users = df.final.ops("USER")
    assert users, "no USER in the final stage"
    assert users[-1].args.split(":")[0] not in ("root", "0"), "the final USER is root"
    assert users[-1].line > max(i.line for i in df.final.ops("RUN")), "RUN after the last USER runs as it"
    created = " ".join(i.args for i in df.final.ops("RUN"))
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1].args)}\b", created), "the user is created in the image"


def check_layer_order(df: Dockerfile) -> None:
    """pyproject.toml + constraints.txt are copied and installed before any code, in the stage itself or in the
    stage whose venv it copies, so a code change does not reinstall the dependencies."""
    with_deps: set[str] = set()
    for stage in df.stages:
        seq = stage.instructions
        assert not any(i.op in ("COPY", "ADD") and i.args.split()[0] == "." for i in seq), "COPY . busts the cache"
        code = [i for i in seq if i.op == "COPY" and _copies_code(i)]
        deps = [i for i in seq if i.op == "RUN" and "-c /tmp/deps/constraints.txt" in i.args]
        deps += [
            i
            for i in seq
            if i.op == "COPY"
            and re.match(r"--from=(\S+) /opt/venv", i.args)
            and re.match(r"--from=(\S+)", i.args).group(1) in with_deps
        ]
        manifests = [i for i in seq if i.op == "COPY" and "pyproject.toml" in i.args and "constraints.txt" in i.args]
        if deps and stage.name:
            with_deps.add(stage.name)
        if not code:
            continue
        assert deps, f"{stage.base}: code copied, dependencies never installed from pyproject + constraints"
        assert all(c.line > deps[-1].line for c in code), "code is copied before the dependency layer"
        if manifests:
            assert manifests[0].line < deps[0].line


def test_final_stage_runs_as_non_root(dockerfile):
    check_non_root(dockerfile)


def test_dependencies_installed_before_the_code_is_copied(dockerfile):
    check_layer_order(dockerfile)


BAD = """ARG BASE_IMAGE=python:3.12@sha256:{digest}
FROM ${{BASE_IMAGE}}
RUN useradd app
COPY pyproject.toml constraints.txt /tmp/deps/
{body}
"""


@pytest.mark.parametrize(
    "body, check, message",
    [
        (
            "COPY services ./services\nRUN pip install -c /tmp/deps/constraints.txt -r r.txt\nUSER app",
            check_layer_order,
            "before the dependency layer",
        ),
        ("RUN pip install -c /tmp/deps/constraints.txt -r r.txt\nCOPY . .\nUSER app", check_layer_order, "COPY ."),
        ("RUN pip install -c /tmp/deps/constraints.txt -r r.txt\nUSER root", check_non_root, "root"),
        ("USER app\nRUN pip install -c /tmp/deps/constraints.txt -r r.txt", check_non_root, "RUN after"),
    ],
    ids=["code-before-deps", "copy-all", "root", "run-after-user"],
)
def test_the_checks_catch_a_bad_dockerfile(tmp_path, body, check, message):
    p = tmp_path / "bad.Dockerfile"
    p.write_text(BAD.format(digest="0" * 64, body=body))
    with pytest.raises(AssertionError, match=message):
        check(parse_dockerfile(p))


def _copies_code(ins: Instruction) -> bool:
    srcs = [s for s in shlex.split(ins.args) if not s.startswith("--")][:-1]
    return any(s.split("/")[0] in CODE_DIRS and not s.startswith("scripts/install-llama-cpp.sh") for s in srcs)


def test_converter_installs_llama_cpp_with_the_project_script():
    df = parse_dockerfile(DOCKER / "converter.Dockerfile")
    runs = [i.args for s in df.stages for i in s.ops("RUN")]
    assert any("install-llama-cpp.sh /opt/venv/bin/python" in r for r in runs)
    copies = [i.args for s in df.stages for i in s.ops("COPY")]
    assert any(c.startswith("scripts/install-llama-cpp.sh ") for c in copies)
    # the pin lives only in the script: no Dockerfile names a llama-cpp-python version
    for p in DOCKERFILES:
        assert not re.search(r"llama[-_]cpp[-_]python\s*==|LLAMA_CPP_PYTHON_VERSION", p.read_text()), p.name
    assert re.search(r'^LLAMA_CPP_PYTHON_VERSION="[\d.]+"', (REPO / "scripts/install-llama-cpp.sh").read_text(), re.M)
    # the runtime stage carries the built venv, not the compiler
    assert any(i.args.startswith("--from=build /opt/venv") for i in df.final.ops("COPY"))
    assert not any("build-essential" in i.args for i in df.final.ops("RUN"))


def test_cuda_image_torch_matches_base_and_native_pin():
    df = parse_dockerfile(DOCKER / "cuda.Dockerfile")
    m = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-", df.final.base)
    assert m, df.final.base
    stage_args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in df.final.ops("ARG")}
    assert stage_args["TORCH_INDEX_URL"].endswith(f"/cu{m.group(1)}{m.group(2)}")
    native = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert stage_args["TORCH_VERSION"] == native  # the same torch as `make test`, in its CUDA build
    assert any("torch==${TORCH_VERSION}" in i.args and "${TORCH_INDEX_URL:+" in i.args for i in df.final.ops("RUN"))


def test_dependency_list_comes_from_pyproject():
    from runpy import run_path

    mod = run_path(str(DOCKER / "project-deps.py"))
    everything = mod["dependencies"](str(REPO / "pyproject.toml"))
    assert any(d.startswith("transformers") for d in everything) and any(d.startswith("torch") for d in everything)
    assert mod["dependencies"](str(REPO / "pyproject.toml"), ["PyYAML", "fastapi"])[0].startswith("pyyaml")
    with pytest.raises(SystemExit, match="not-a-dep"):
        mod["dependencies"](str(REPO / "pyproject.toml"), ["not-a-dep"])


# ---- the think-api image has every package its code imports ------------------------------------------------------

NOT_IN_THINK_API_IMAGE = {"llama_cpp": "the in-process llama.cpp backend (runs natively or in the converter image)"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports(roots: list[str]) -> set[str]:
    """Top-level third-party modules imported anywhere (module or function level) by `roots` and the project
    modules they import, transitively."""
    todo = [f for r in roots for f in sorted(REPO.joinpath(*r.split(".")).glob("*.py"))]
    seen: set[Path] = set()
    external: set[str] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _imports(f):
            top = name.split(".")[0]
            if top in ("shared", "services"):
                mf = _module_file(name)
                if mf is not None:
                    todo.append(mf)
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
    return external


def _closure(dists: list[str]) -> set[str]:
    """The distributions pip installs for `dists` (their requirements, transitively, as installed here)."""
    out: set[str] = set()
    todo = list(dists)
    while todo:
        d = re.split(r"[\s<>=!~;\[]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if d in out:
            continue
        out.add(d)
        try:
            reqs = importlib.metadata.requires(d) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [r for r in reqs if "extra ==" not in r]
    return out


def test_think_api_image_covers_the_imports_of_what_it_runs():
    if not (REPO / "services" / "think_api" / "cli.py").is_file():
        pytest.skip("services/think_api not written yet")
    text = (DOCKER / "think-api.Dockerfile").read_text()
    only = re.search(r"--only ([^>]+)>", text).group(1).split()
    installed = _closure(only)
    dist_of = importlib.metadata.packages_distributions()
    missing = {}
    for top in sorted(third_party_imports(["services.think_api", "services.ollama", "services.stack"])):
        if top in NOT_IN_THINK_API_IMAGE:
            continue
        dists = {d.lower().replace("_", "-") for d in dist_of.get(top, [top])}
        if not dists & installed:
            missing[top] = sorted(dists)
    assert not missing, f"imported by think-api/ollama code but not installed in its image: {missing}"
    assert "torch" not in installed  # the point of a separate small image


def test_the_cuda_image_build_fails_on_a_torch_without_its_cuda():
    """The check the CUDA image's build runs after installing torch: a CPU wheel (this venv's, on the CPU) for a
    cu130 image fails the build with the reason; the CPU image (no index) passes."""
    import subprocess
    import sys

    check = DOCKER / "torch-cuda-check.py"
    assert 'torch-cuda-check.py "$TORCH_INDEX_URL"' in (DOCKER / "cuda.Dockerfile").read_text()
    r = subprocess.run([sys.executable, str(check), ""], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nothing to check" in r.stdout
    import torch

    if torch.version.cuda == "13.0":
        pytest.skip("this torch is the cu130 build")
    r = subprocess.run(
        [sys.executable, str(check), "https://download.pytorch.org/whl/cu130"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "the image for cu130" in r.stderr and "wrong wheel" in r.stderr
