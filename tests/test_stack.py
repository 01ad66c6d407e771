"""services.stack: a stage container waits (bounded) for its upstream's manifest, and for its upstream to have
finished in this pipeline, before it runs; it leaves a finish marker for its downstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.stack import wait
from services.stack.wait import Upstream, pending, wait_for

REPO = Path(__file__).resolve().parents[1]


def write_manifest(d: Path, stage: str = "x") -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage}))


def marker(stack: Path, name: str, pipeline_id: str, code: int = 0) -> None:
    wait.write_marker(stack, name, pipeline_id, code, [["true"]], time.time())


# ---- units -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds", [("0", 0), ("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("0.5", 0.5)]
)
def test_durations(text, seconds):
    assert wait.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "7w", "-1", "d", "1 2"])
def test_bad_durations(bad):
    with pytest.raises(ValueError, match="not a duration"):
        wait.parse_duration(bad)


def test_split_commands():
    assert wait.split_commands(["a", "-x", "&&", "b"]) == [["a", "-x"], ["b"]]
    assert wait.split_commands(["a", "&&b"]) == [["a", "&&b"]]  # only a whole `&&` argument separates
    for bad in (["&&", "a"], ["a", "&&"], ["a", "&&", "&&", "b"]):
        with pytest.raises(ValueError, match="empty command"):
            wait.split_commands(bad)


def test_upstream_spec():
    assert Upstream.parse("trainer=/data/runs/x/train/final") == Upstream("trainer", Path("/data/runs/x/train/final"))
    assert Upstream.parse("ollama-import") == Upstream("ollama-import", None)
    for bad in ("", "=dir", "a b=dir", "name="):
        with pytest.raises(ValueError, match="expected NAME or NAME=DIR"):
            Upstream.parse(bad)


def test_pending_states(tmp_path):
    up, stack = Upstream("dataset", tmp_path / "ds"), tmp_path / "stack"
    assert "no manifest yet at" in pending(up, stack, "")
    write_manifest(up.manifest_dir)
    assert pending(up, stack, "") is None  # no pipeline id: the manifest is enough
    assert "has not finished in pipeline p2 yet" in pending(up, stack, "p2")
    marker(stack, "dataset", "p1")
    assert "its last finish was in pipeline 'p1'" in pending(up, stack, "p2")  # a stale run does not count
    marker(stack, "dataset", "p2", code=1)
    assert "failed in this pipeline (exit 1)" in pending(up, stack, "p2")
    marker(stack, "dataset", "p2")
    assert pending(up, stack, "p2") is None
    (tmp_path / "ds" / "manifest.json").write_text("{trunc")  # a half-written file is no manifest
    assert "no manifest yet" in pending(up, stack, "p2")


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_wait_gives_up_after_the_timeout(tmp_path):
    clock = FakeClock()
    reason = wait_for(
        [Upstream("baker", tmp_path / "baked")],
        name="converter",
        stack_dir=tmp_path,
        pipeline_id="",
        timeout=60,
        interval=7,
        clock=clock,
        sleep=clock.sleep,
    )
    assert reason and "no manifest yet" in reason
    assert clock.t == 60 and sum(clock.sleeps) == 60 and max(clock.sleeps) == 7  # never sleeps past the deadline


def test_wait_returns_once_the_upstream_is_done(tmp_path, caplog):
    clock = FakeClock()
    up = Upstream("trainer", tmp_path / "final")

    def sleep(s):
        clock.sleep(s)
        if clock.t >= 30:
            write_manifest(up.manifest_dir)
            marker(tmp_path, "trainer", "p")

    caplog.set_level("INFO", logger="so8t.stack")
    assert (
        wait_for(
            [up],
            name="baker",
            stack_dir=tmp_path,
            pipeline_id="p",
            timeout=3600,
            interval=10,
            report_every=600,
            clock=clock,
            sleep=sleep,
        )
        is None
    )
    assert clock.t == 30
    text = caplog.text
    assert "baker waits for trainer (manifest" in text and "[pipeline p]" in text and "gives up after 1h00m" in text
    assert text.count("still waiting") == 1  # logged when the reason changes, not every poll
    assert "upstream done after 30s" in text


def test_timeout_zero_looks_once(tmp_path):
    clock = FakeClock()
    assert wait_for(
        [Upstream("a", tmp_path / "a")],
        name="b",
        stack_dir=tmp_path,
        pipeline_id="",
        timeout=0,
        clock=clock,
        sleep=clock.sleep,
    )
    assert clock.sleeps == []


# ---- the CLI as the containers run it --------------------------------------------------------------------------


def stack_cmd(name: str, *after: str, command: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "services.stack", "--name", name]
    for a in after:
        argv += ["--after", a]
    return argv + ["--", *command]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        SO8T_STACK_DIR=str(tmp_path / "stack"),
        SO8T_WAIT_INTERVAL="0.1",
        PYTHONUNBUFFERED="1",
        SO8T_WAIT_TIMEOUT="30",
    )
    env.pop("SO8T_PIPELINE_ID", None)
    env.update(extra)
    return env


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_cli_fails_at_once_when_the_upstream_is_missing(tmp_path):
    r = subprocess.run(
        stack_cmd("trainer", f"dataset={tmp_path / 'ds'}", command=py("print('ran')")),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=env_for(tmp_path, SO8T_WAIT_TIMEOUT="0"),
    )
    assert r.returncode == wait.EX_TEMPFAIL and "ran" not in r.stdout
    assert f"no manifest yet at {tmp_path / 'ds' / 'manifest.json'}" in r.stderr and "make <stage>" in r.stderr
    assert not (tmp_path / "stack" / "trainer.json").exists()


def test_cli_runs_the_chain_and_records_the_exit_code(tmp_path):
    write_manifest(tmp_path / "ds")
    marker(tmp_path / "stack", "converter", "p")
    side = tmp_path / "second-ran"
    r = subprocess.run(
        stack_cmd(
            "ollama-import",
            f"converter={tmp_path / 'ds'}",
            command=py("import sys; sys.exit(3)") + ["&&"] + py(f"open({str(side)!r}, 'w')"),
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=env_for(tmp_path, SO8T_PIPELINE_ID="p"),
    )
    assert r.returncode == 3 and not side.exists()  # stops at the first failure
    m = json.loads((tmp_path / "stack" / "ollama-import.json").read_text())
    assert m["exit_code"] == 3 and m["state"] == "failed" and m["pipeline_id"] == "p" and len(m["commands"]) == 2
    r = subprocess.run(
        stack_cmd("ollama-import", command=py("print('one')") + ["&&"] + py("print('two')")),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=env_for(tmp_path, SO8T_PIPELINE_ID="p"),
    )
    assert r.returncode == 0 and r.stdout.split() == ["one", "two"]
    assert json.loads((tmp_path / "stack" / "ollama-import.json").read_text())["state"] == "done"


def test_a_stale_manifest_does_not_release_the_next_stage(tmp_path):
    """The power-loss design end to end: both stages start at once under a new pipeline id while the last run's
    manifest and finish marker are still on disk; the downstream runs only after the upstream finished now."""
    ds = tmp_path / "ds"
    write_manifest(ds)
    marker(tmp_path / "stack", "dataset", "previous-run")
    up_done, down_start = tmp_path / "up_done", tmp_path / "down_start"
    upstream = py(
        f"import time, json; time.sleep(1.0); open({str(ds / 'manifest.json')!r}, 'w').write('{{}}'); "
        f"open({str(up_done)!r}, 'w').write(repr(time.time()))"
    )
    downstream = py(f"import time; open({str(down_start)!r}, 'w').write(repr(time.time()))")
    env = env_for(tmp_path, SO8T_PIPELINE_ID="this-run", SO8T_WAIT_TIMEOUT="60")
    down = subprocess.Popen(
        stack_cmd("trainer", f"dataset={ds}", command=downstream), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    up = subprocess.Popen(stack_cmd("dataset", command=upstream), cwd=REPO, env=env)
    assert up.wait(60) == 0 and down.wait(60) == 0
    assert float(down_start.read_text()) >= float(up_done.read_text())
    log = down.stderr.read()
    assert "its last finish was in pipeline 'previous-run'" in log and "upstream done after" in log


def test_sigterm_while_waiting_exits_at_once(tmp_path):
    p = subprocess.Popen(
        stack_cmd("baker", f"trainer={tmp_path / 'final'}", command=py("print('ran')")),
        cwd=REPO,
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while "waits for trainer" not in p.stderr.readline() and time.time() < deadline:
        pass
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 128 + signal.SIGTERM
    assert "ran" not in p.stdout.read() and not (tmp_path / "stack" / "baker.json").exists()


def test_sigterm_reaches_the_stage_and_a_stopped_stage_is_not_done(tmp_path):
    got = tmp_path / "got-term"
    child = py(
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, 'w'), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)"
    )
    p = subprocess.Popen(
        stack_cmd("trainer", command=child), cwd=REPO, env=env_for(tmp_path), stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 128 + signal.SIGTERM
    assert got.exists()  # the trainer saw the signal (docker stop -> its own clean shutdown)
    m = json.loads((tmp_path / "stack" / "trainer.json").read_text())
    assert m["state"] == "failed" and m["exit_code"] == 143  # even though it exited 0
