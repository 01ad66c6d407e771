"""shared.stage (skip -> staging -> manifest last), shared.errors at the CLI edge, shared.flags."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from services.cli import report
from shared import flags, manifest, stage
from shared.config import StrictModel
from shared.errors import CheckFailed, InputError

REPO = Path(__file__).resolve().parents[1]


def _spec(out: Path, src: Path, config: dict | None = None) -> stage.Spec:
    return stage.Spec("demo", out, {"src": manifest.describe_input(src)}, config or {"n": 1})


def _build(tmp: Path) -> stage.Built:
    (tmp / "a.txt").write_text("alpha")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(b"\0" * 10)
    return stage.Built({"written": 2}, {"a": "a.txt"}, {"extra_key": 7})


@pytest.fixture()
def src(tmp_path) -> Path:
    p = tmp_path / "src.txt"
    p.write_text("input")
    return p


def test_build_then_skip_then_rebuild_on_any_change(tmp_path, src):
    out = tmp_path / "out"
    first = stage.run(_spec(out, src), _build)
    m = manifest.read(out)
    assert not first.skipped and first.manifest == m and first.metrics == {"written": 2}
    assert m["files"] == {"a.txt": 5, "sub/b.bin": 10} and m["extra_key"] == 7 and m["outputs"] == {"a": "a.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.txt"]  # no staging dir left behind

    calls = []
    again = stage.run(_spec(out, src), lambda tmp: calls.append(tmp) or _build(tmp))
    assert again.skipped and again.manifest == m and calls == []

    assert not stage.run(_spec(out, src, {"n": 2}), _build).skipped  # another config
    src.write_text("changed input")
    assert not stage.run(_spec(out, src, {"n": 2}), _build).skipped  # another input
    (out / "sub" / "b.bin").write_bytes(b"\0")  # an output damaged after the fact: not up to date any more
    assert _spec(out, src, {"n": 2}).current() is None
    (out / "sub" / "b.bin").unlink()
    assert not stage.run(_spec(out, src, {"n": 2}), _build).skipped
    assert stage.run(_spec(out, src, {"n": 2}), _build, force=False).skipped
    assert not stage.run(_spec(out, src, {"n": 2}), _build, force=True).skipped


def test_a_failed_build_leaves_the_previous_output_and_says_so(tmp_path, src):
    out = tmp_path / "out"
    stage.run(_spec(out, src), _build)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(tmp: Path) -> stage.Built:
        (tmp / "a.txt").write_text("half")
        raise CheckFailed("the new artifact failed its check", {"max_abs": 3.0})

    with pytest.raises(CheckFailed) as err:
        stage.run(_spec(out, src, {"n": 2}), broken)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert err.value.output == out and err.value.report == {"max_abs": 3.0} and err.value.exit_code == 1
    assert (
        report("so8t demo", err.value)
        == f"so8t demo: the new artifact failed its check\nthe previous {out} is untouched"
    )
    fresh = InputError("bad input")
    with pytest.raises(InputError):
        stage.run(_spec(tmp_path / "new", src), lambda tmp: (_ for _ in ()).throw(fresh))
    assert report("so8t demo", fresh).endswith(f"nothing was written to {tmp_path / 'new'}") and fresh.exit_code == 2


KILLED_BUILD = """
import sys, time
from pathlib import Path
from shared import manifest, stage
out, src = Path(sys.argv[1]), Path(sys.argv[2])
spec = stage.Spec("demo", out, {"src": manifest.describe_input(src)}, {"n": 3})
def build(tmp):
    (tmp / "big.bin").write_bytes(b"x" * 4096)
    print("building", flush=True)
    time.sleep(60)
stage.run(spec, build)
"""


def test_leftovers_of_a_killed_build_are_removed_by_the_next_run(tmp_path, src):
    """SIGKILL mid-build leaves its staging directory (a whole copy); the next run of the stage removes it."""
    out = tmp_path / "out"
    stage.run(_spec(out, src), _build)
    for _ in range(2):
        p = subprocess.Popen(
            [sys.executable, "-c", KILLED_BUILD, str(out), str(src)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert p.stdout.readline().strip() == "building"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the second attempt removed the first's
    assert _spec(out, src).current() is not None  # the previous output is intact and still up to date
    (tmp_path / ".outer.keep.tmp").mkdir()  # another target's temp: not this stage's to remove
    stage.run(_spec(out, src, {"n": 3}), _build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".outer.keep.tmp", "out", "src.txt"]


def test_errors_reach_the_cli_as_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: -3\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.trainer",
            "--config",
            str(bad),
            "--dataset",
            "x",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and f"{bad}:2: train.max_steps: Input should be greater than 0" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.baker",
            "--trained",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "baked"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


class Demo(StrictModel):
    size: float = Field(2.0, gt=0, description="a size in GiB")
    mode: str = Field("a", pattern="^[ab]$", description="a or b")
    on: bool = Field(False, description="switch")
    per: dict[str, float] = Field(default_factory=lambda: {"x": 1.0}, description="per key")


def test_flags_come_from_the_model(capsys):
    p = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    flags.add(p, Demo)
    help_ = p.format_help()
    for text in (
        "--size SIZE",
        "a size in GiB (default 2)",
        "--on, --no-on",
        "switch (default off)",
        "--per KEY=VALUE",
        "per key; repeatable (default x=1)",
    ):
        assert text in " ".join(help_.split()), text
    args = p.parse_args(["--size", "0.5", "--on", "--per", "y=3"])
    assert flags.given(args, Demo) == {"size": 0.5, "on": True, "per": {"y": 3.0}}
    opts = flags.parse(Demo, args)
    assert opts == Demo(size=0.5, on=True, per={"y": 3.0})
    assert flags.to_argv(opts) == ["--size", "0.5", "--on", "--per", "y=3"]
    with pytest.raises(Exception, match="size: Input should be greater than 0"):
        flags.parse(Demo, p.parse_args(["--size", "-1"]))  # the model's bound, named
    with pytest.raises(argparse.ArgumentError, match="expected KEY=VALUE"):
        p.parse_args(["--per", "novalue"])


def test_help_imports_nothing_heavy():
    """`so8t <stage> --help` builds every parser from the option models without importing torch or llama.cpp."""
    code = (
        "import json, sys; from services.cli import build_parser; build_parser(); "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'numpy') if m in sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
