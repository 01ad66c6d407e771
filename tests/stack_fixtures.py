"""What the stack test (tests/test_stack_e2e.py) and the deploy test (tests/test_deploy_e2e.py) share, loaded by both
with `pytest_plugins`: one private Docker engine with the CPU stack's images (built once per session, cached across
sessions in the engine's data root), the data folder the stack test's chain finishes in (the deploy test ships it to
another box), a compose project of the CPU stack, and the order: the deploy test runs after the stack test.

Needs root (dockerd, debootstrap) and Debian's packages; the fixtures skip, with the reason, otherwise.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.pipeline.config import PipelineConfig
from services.pipeline.run import free_port
from shared.config import load_config
from shared.layout import Layout

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "pipeline" / "tiny.yaml"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 client, which matches the daemon of scripts/cpu-engine.sh
UID = "1000"  # the stages run as a non-root user, as on a user's machine
CHAIN_TIMEOUT = 1800
CPU_FILES = "compose.yaml:docker/compose.cpu.yaml"
PROJECTS = ("so8t-cut", "so8t-stop", "so8t-deploy-a")  # compose projects the stack tests run on the engine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The deploy test last: it ships the data folder whose chain the stack test finished (else it runs one)."""
    items.sort(key=lambda item: "test_deploy_e2e.py" in item.nodeid)


def compose_bin() -> str:
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")


def cpu_engine(action: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """scripts/cpu-engine.sh ACTION for the engine SO8T_DOCKER_DIR in `env` names (the default one without)."""
    return subprocess.run(
        [str(REPO / "scripts" / "cpu-engine.sh"), action], env=env, capture_output=True, text=True, timeout=timeout
    )


def _lock_engine(state: Path):
    """One stack test per engine at a time: it cuts the power of the engine it shares with any other run."""
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "stack-test.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        pytest.skip(f"another stack test is using the engine in {state} (its lock: {state / 'stack-test.lock'})")
    return lock


@pytest.fixture(scope="session")
def engine() -> Iterator[dict[str, str]]:
    """Box A: the private engine of scripts/cpu-engine.sh with every image of the CPU stack (scripts/images-cpu.sh);
    the environment whose DOCKER_HOST reaches it."""
    if os.geteuid() != 0:
        pytest.skip("the stack and deploy tests need root (dockerd, debootstrap)")
    lock = _lock_engine(Path(os.environ.get("SO8T_DOCKER_DIR", "/var/tmp/so8t-docker")))
    started = cpu_engine("start", dict(os.environ))
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
    remove_projects(env)  # what an earlier, interrupted run left: containers whose restart policy brings them back
    yield env
    remove_projects(env)
    lock.close()


def remove_projects(env: dict[str, str]) -> None:
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


def serving_env(root: Path) -> dict[str, str]:
    """What the CPU stack's serving needs of a box beside its data: free loopback ports for llama-server and the think
    API, and the think API's own folders (server secret, audit log, anchor), 0700 and the stages' user's, as
    `make secrets` makes them (without them Docker creates ./state/* as root and the API cannot write its secret)."""
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    out = dict(zip(("LLAMA_SERVER_PORT", "THINK_API_PORT"), map(str, ports), strict=True))
    for key, name in (("SO8T_SECRET_DIR", "secret"), ("SO8T_AUDIT_DIR", "audit"), ("SO8T_ANCHOR_DIR", "anchor")):
        d = root / name
        d.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chown(d, int(UID), int(UID))
        out[key] = str(d)
    return out


@pytest.fixture(scope="session")
def stack_data(tmp_path_factory) -> Path:
    """The data folder of the stack test's chain (a fresh one, then the same one with the run removed); at the end
    of the stack test it holds a finished chain: dataset, tiny base, adapter, bake, GGUFs, eval."""
    return tmp_path_factory.mktemp("stack") / "data"


class Stack:
    """One compose project of the CPU stack on its own data folder."""

    def __init__(self, name: str, data: Path, env: dict[str, str]):
        self.name, self.data = name, data
        self.env = dict(
            env,
            DATA_DIR=str(data),
            SO8T_UID=UID,
            SO8T_GID=UID,
            SO8T_PIPELINE_ID=f"{name}-{time.time():.0f}",
            SO8T_WAIT_INTERVAL="2s",
            SO8T_PROFILE="tiny",
        )
        self.run = Layout(data).run(load_config(PipelineConfig, PROFILE).run_id)
        data.mkdir(parents=True, exist_ok=True)
        os.chown(data, int(UID), int(UID))
        self.env.update(serving_env(data.parent / f"{name}-state"))
        self.port = int(self.env["THINK_API_PORT"])

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        files = [a for f in CPU_FILES.split(":") for a in ("-f", f)]
        cmd = [compose_bin(), "--project-directory", str(REPO), "-p", self.name, *files, "--profile", "pipeline"]
        r = subprocess.run([*cmd, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
        assert not check or r.returncode == 0, r.stderr[-3000:]
        return r

    def wait(self, what: str, done: Callable[[], bool], timeout: float = CHAIN_TIMEOUT) -> None:
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
