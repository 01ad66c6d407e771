"""The real stack: images built from nothing (scripts/images-cpu.sh), `docker compose up` of the CPU override on a
fresh data folder, and two host failures while the trainer trains, after its first checkpoint:

- a power cut: SIGKILL of the engine (dockerd, containerd, the shims, every container process), then dockerd
  started again and nothing else done by hand;
- an orderly shutdown: SIGTERM to dockerd (it stops the containers: the trainer's stage exits non-zero, so its
  `on-failure` policy restarts it at the next start), then dockerd started again.

Each time the chain finishes by itself: the daemon restarts the trainer, which resumes from its checkpoint, the
waiting stages proceed, the think API answers POST /think from its container; the trained adapter and gates are
bitwise those of an uninterrupted native run of the same profile, and every stage's manifest is there.

Needs root (dockerd, debootstrap) and Debian's packages; skipped, with the reason, otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from services.pipeline.config import PipelineConfig
from services.pipeline.plan import plan
from services.pipeline.run import free_port
from services.trainer import artifact
from shared.config import load_config
from shared.layout import Layout

pytestmark = [pytest.mark.slow, pytest.mark.stack]
REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "pipeline" / "tiny.yaml"
DOCKER = "/usr/bin/docker"
UID = "1000"  # the stages run as a non-root user, as on a user's machine
CHAIN_TIMEOUT = 1800


def _compose_bin() -> str:
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")


@pytest.fixture(scope="module")
def engine():
    if os.geteuid() != 0:
        pytest.skip("the stack test needs root (dockerd, debootstrap)")
    # one stack test per machine at a time: it cuts the power of the engine it shares with any other run
    state = Path(os.environ.get("SO8T_DOCKER_DIR", "/var/tmp/so8t-docker"))
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "stack-test.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pytest.skip(f"another stack test is using the engine in {state} (its lock: {lock.name})")
    started = subprocess.run(
        [str(REPO / "scripts" / "cpu-engine.sh"), "start"], capture_output=True, text=True, timeout=600
    )
    if started.returncode == 77:
        pytest.skip(f"no Docker engine can run here: {started.stderr.strip()[-300:]}")
    assert started.returncode == 0, started.stderr
    env = dict(os.environ, **dict([started.stdout.strip().splitlines()[-1].split("=", 1)]))
    t0 = time.time()
    built = subprocess.run(
        [str(REPO / "scripts" / "images-cpu.sh"), sys.executable],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        cwd=REPO,
    )
    if built.returncode == 77:
        pytest.skip(f"images cannot be built here: {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr[-4000:]
    print(f"images: {time.time() - t0:.0f} s", file=sys.stderr)
    _remove_projects(env)  # what an earlier, interrupted run left: containers whose restart policy brings them back
    yield env
    _remove_projects(env)
    lock.close()


PROJECTS = ("so8t-cut", "so8t-stop")


def _remove_projects(env: dict[str, str]) -> None:
    for project in PROJECTS:
        ids = subprocess.run(
            [DOCKER, "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        if ids:
            subprocess.run([DOCKER, "rm", "-f", *ids], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same profile's dataset and training, natively and uninterrupted."""
    root = tmp_path_factory.mktemp("native")
    cfg = load_config(PipelineConfig, PROFILE)
    env = dict(os.environ, DATA_DIR=str(root), SO8T_PROGRESS="0")
    for stage in plan(cfg, Layout(root)):
        if stage.name in ("tiny-model", "dataset", "train"):
            for argv in stage.commands:
                r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
                assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return _tensors(Layout(root).run(cfg.run_id).final)


def _tensors(final: Path) -> dict:
    out = {f"adapter:{k}": v for k, v in load_file(str(final / artifact.ADAPTER_WEIGHTS)).items()}
    out |= {f"gates:{k}": v for k, v in load_file(str(final / artifact.GATES)).items()}
    return out


class Stack:
    """One compose project of the CPU stack on its own data folder."""

    def __init__(self, name: str, data: Path, env: dict[str, str]):
        self.name, self.data = name, data
        self.port = free_port()
        self.env = dict(
            env,
            DATA_DIR=str(data),
            SO8T_UID=UID,
            SO8T_GID=UID,
            SO8T_PIPELINE_ID=f"{name}-{time.time():.0f}",
            SO8T_WAIT_INTERVAL="2s",
            THINK_API_PORT=str(self.port),
            SO8T_PROFILE="tiny",
        )
        self.run = Layout(data).run(load_config(PipelineConfig, PROFILE).run_id)
        data.mkdir(parents=True, exist_ok=True)
        os.chown(data, int(UID), int(UID))

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [
            _compose_bin(),
            "--project-directory",
            str(REPO),
            "-p",
            self.name,
            "-f",
            "compose.yaml",
            "-f",
            "docker/compose.cpu.yaml",
            "--profile",
            "pipeline",
            *args,
        ]
        r = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
        assert not check or r.returncode == 0, r.stderr[-3000:]
        return r

    def wait(self, what: str, done, timeout: float = CHAIN_TIMEOUT) -> None:
        deadline = time.time() + timeout
        while not done():
            if time.time() > deadline:
                logs = self.compose("logs", "--tail", "30", check=False).stdout[-6000:]
                pytest.fail(f"{self.name}: {what} did not happen in {timeout:.0f} s\n{logs}")
            time.sleep(2)

    def checkpointed(self) -> bool:
        return any((p / "checkpoint.json").is_file() for p in (self.run.train / "checkpoints").glob("checkpoint-*"))

    def answers(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def finished(self) -> bool:
        return (self.run.eval / "manifest.json").is_file() and self.answers()


def _engine(action: str, env: dict[str, str]) -> None:
    r = subprocess.run(
        [str(REPO / "scripts" / "cpu-engine.sh"), action], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr


def _exercise(stack: Stack, failure: str, reference: dict) -> None:
    stack.compose("up", "-d")
    try:
        stack.wait("the trainer's first checkpoint", stack.checkpointed)
        assert not (stack.run.final / "manifest.json").exists(), "the trainer finished before the failure"
        _engine(failure, stack.env)  # power-cut or stop
        _engine("start", stack.env)  # the host comes back: dockerd, and nothing else
        stack.wait("the chain's end (eval manifest and a healthy think API)", stack.finished)
        r = httpx.post(f"http://127.0.0.1:{stack.port}/think", json={"prompt": "2+2はいくつですか？"}, timeout=120)
        body = r.json()
        assert r.status_code in (200, 502) and "request_id" in body and "思考ステップ" not in json.dumps(body)
        health = httpx.get(f"http://127.0.0.1:{stack.port}/healthz", timeout=30).json()
        assert health["backend"] == "openai", health  # /think went through the llama-server service (compose.cpu)
        assert "processing task" in stack.compose("logs", "llama-server").stdout  # the engine generated it
        log = stack.compose("logs", "trainer").stdout
        assert "resuming from checkpoint-" in log, log[-3000:]
        for d in (stack.run.final, stack.run.baked, stack.run.gguf, stack.run.eval):
            assert (d / "manifest.json").is_file(), d
        assert (stack.data / "datasets" / "example" / "manifest.json").is_file()
        got = _tensors(stack.run.final)
        assert sorted(got) == sorted(reference)
        assert [k for k in got if not (got[k] == reference[k]).all()] == []  # bitwise the native run's
        owners = {p.stat().st_uid for p in stack.run.root.rglob("*")}
        assert owners == {int(UID)}, owners  # every file on the bind mount is the invoking user's
    finally:
        _engine("start", stack.env)  # a failure may have left the engine down: its containers would come back later
        stack.compose("down", "--timeout", "5", check=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack") / "data"


def test_power_cut_while_training(engine, reference, data):
    """On a fresh data folder with the shipped example input: the whole chain, cut while the trainer trains."""
    _exercise(Stack("so8t-cut", data, engine), "power-cut", reference)


def test_orderly_shutdown_while_training(engine, reference, data):
    """The same data folder with the run removed (the dataset and the tiny base stay, skipped by their manifests):
    the chain again, stopped in an orderly way while the trainer trains."""
    import shutil

    shutil.rmtree(Layout(data).run(load_config(PipelineConfig, PROFILE).run_id).root, ignore_errors=True)
    _exercise(Stack("so8t-stop", data, engine), "stop", reference)
