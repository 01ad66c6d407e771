"""The stack moved to another box, for real, on this one machine (root; skipped with the reason otherwise):

- box A: the stack test's private engine with the CPU stack's images (tests/stack_fixtures.py) and, as its data,
  the folder whose chain the stack test finished (run alone, this test runs that chain on A first);
- a registry: Debian's `docker-registry` (the distribution registry v2) on 127.0.0.1:<port>, plain HTTP (dockerd
  trusts 127.0.0.0/8 without TLS);
- box B: a second private engine (scripts/cpu-engine.sh with its own data root, exec root and socket), empty;
- the ssh route: Debian's sshd on 127.0.0.1:<port> with a throwaway key whose forced command is
  `docker system dial-stdio` on B's socket, so DOCKER_HOST=ssh://root@127.0.0.1:<port> is box B.

Every step is a `make` target with the CPU override chosen by COMPOSE_FILE. On A, `make push` (REGISTRY=
127.0.0.1:<port>/so8t) builds from A's cache, pushes and writes the digests to IMAGES_LOCK. On B, before any pull,
`make pipeline BUILD=0`, `make up BUILD=0` and `make train BUILD=0` stop at once naming the missing images; `make pull`
gets exactly the pushed digests; `make bake` alone on an empty data folder stops at once naming the missing upstream;
with a copy of A's data folder, `make dataset` alone builds a fresh dataset id (equal to A's), and `make up BUILD=0`
through ssh serves /think from A's GGUF. B built nothing: no build in any log, no build cache, no image but the pulled
ones, each image id equal to A's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.pipeline.run import free_port
from shared.layout import Layout

pytest.register_assert_rewrite("stack_fixtures")  # before its import here, as pytest_plugins would
from stack_fixtures import CHAIN_TIMEOUT, CPU_FILES, DOCKER, REPO, UID, compose_bin, cpu_engine, serving_env  # noqa: E402

pytest_plugins = ["stack_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.stack]

B_DIR = Path("/var/tmp/so8t-docker-b")  # box B's engine: data root, exec root and socket (short: socket paths)
RUN_ID = "tiny"
FIGURES: dict[str, str] = {}  # measured here, printed at the end (README "Deploying to another GPU box")
B_LOGS: list[str] = []  # everything make printed on box B: no build may appear in it


# ---- helpers ------------------------------------------------------------------------------------------------------


def _make(
    target: str, *args: str, env: dict[str, str], timeout: float = 1200
) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    r = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r, time.time() - t0


def _docker(env: dict[str, str], *args: str) -> str:
    r = subprocess.run([DOCKER, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr[-2000:]}"
    return r.stdout


def _debian_tool(path: str, package: str) -> str:
    """An executable of a Debian package, installed (after apt-get update) when absent; skip with the reason when it
    cannot be."""
    if not Path(path).is_file():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", package], env=env, capture_output=True, text=True, timeout=600
        )
        if r.returncode != 0 or not Path(path).is_file():
            pytest.skip(f"{path} missing and Debian's {package} cannot be installed: {r.stderr.strip()[-300:]}")
    return path


def _wait_for(what: str, done, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not done():
        assert proc is None or proc.poll() is None, f"{what}: the process exited {proc.returncode}"
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """A PATH entry: `docker` is Debian's 20.10 client, the one that matches the private engines."""
    d = tmp_path_factory.mktemp("tools")
    (d / "docker").symlink_to(DOCKER)
    return d


def _env(base: dict[str, str], tools: Path, docker_host: str, data: Path, **extra: str) -> dict[str, str]:
    """What a user sets for make: the engine, the CPU override, the data folder, the profile."""
    return dict(
        base,
        PATH=f"{tools}:{os.environ['PATH']}",
        DOCKER_HOST=docker_host,
        COMPOSE=compose_bin(),
        COMPOSE_FILE=CPU_FILES,
        DATA_DIR=str(data),
        SO8T_PROFILE="tiny",
        SO8T_UID=UID,
        SO8T_GID=UID,
        **extra,
    )


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    if FIGURES:
        print("\ndeploy figures: " + "; ".join(f"{k} {v}" for k, v in FIGURES.items()), file=sys.stderr)


# ---- the registry, box B and the ssh route ------------------------------------------------------------------------


@dataclass
class Registry:
    name: str  # REGISTRY: host:port/namespace
    storage: Path


@pytest.fixture(scope="module")
def registry(engine, tmp_path_factory):
    exe = _debian_tool("/usr/bin/docker-registry", "docker-registry")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "config.yml").write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'storage'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    with open(root / "registry.log", "w") as log:
        proc = subprocess.Popen([exe, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for("the registry", lambda: _listens(port), 30, proc)
        yield Registry(f"127.0.0.1:{port}/so8t", root / "storage")
    finally:
        proc.terminate()
        proc.wait(30)


def _unmount_under(path: Path) -> None:
    """Mounts an engine killed mid-way may leave under its state directory, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(f"{path}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, timeout=60)


def _drop_engine(env: dict[str, str]) -> None:
    cpu_engine("stop", env)  # SIGTERM: dockerd stops its containers and unmounts their layers
    cpu_engine("power-cut", env)  # whatever of this engine outlived it (containerd, shims), by PID
    _unmount_under(B_DIR)
    shutil.rmtree(B_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def box_b(engine):
    """Box B: an empty private engine of its own; DOCKER_HOST=unix://... for it."""
    env = dict(os.environ, SO8T_DOCKER_DIR=str(B_DIR))
    _drop_engine(env)  # what an interrupted run left
    started = cpu_engine("start", env)
    assert started.returncode == 0, started.stderr
    host = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    try:
        yield host
    finally:
        _drop_engine(env)


@pytest.fixture(scope="module")
def ssh_b(box_b, tools, tmp_path_factory):
    """DOCKER_HOST=ssh://root@127.0.0.1:<port> for box B: sshd on loopback, a throwaway key that can do one thing
    (`docker system dial-stdio` on B's socket), and a PATH entry whose `ssh` uses this key and host key only."""
    sshd = _debian_tool("/usr/sbin/sshd", "openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=60)
    port = free_port()
    forced = f"{DOCKER} -H {box_b} system dial-stdio"
    (d / "authorized_keys").write_text(f'command="{forced}",restrict {(d / "client_key.pub").read_text()}')
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nAuthenticationMethods publickey\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin forced-commands-only\nStrictModes no\nUsePAM no\n"
    )
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1\n  User root\n  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    bin_dir = d / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {d / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    (bin_dir / "docker").symlink_to(DOCKER)
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory
    made = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for("sshd", lambda: _listens(port), 30, proc)
        yield f"ssh://root@127.0.0.1:{port}", bin_dir
    finally:
        proc.terminate()
        proc.wait(30)
        if made:
            privsep.rmdir()


# ---- A's side: a finished chain and the push ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def a_data(engine, stack_data, tools) -> Path:
    """A's data folder with a finished chain: $SO8T_DEPLOY_A_DATA when set, the stack test's when it ran in this
    session, else the chain run here by `make pipeline BUILD=0` on A (it follows it to the end: eval, no Ollama)."""
    if os.environ.get("SO8T_DEPLOY_A_DATA"):
        return Path(os.environ["SO8T_DEPLOY_A_DATA"])
    run = Layout(stack_data).run(RUN_ID)
    if not all((d / "manifest.json").is_file() for d in (run.gguf, run.eval)):
        stack_data.mkdir(parents=True, exist_ok=True)
        os.chown(stack_data, int(UID), int(UID))
        env = _env(
            engine,
            tools,
            engine["DOCKER_HOST"],
            stack_data,
            COMPOSE_PROJECT_NAME="so8t-deploy-a",
            SO8T_WAIT_INTERVAL="2s",
            **serving_env(stack_data.parent / "a-state"),
        )
        try:
            r, seconds = _make("pipeline", "BUILD=0", env=env, timeout=CHAIN_TIMEOUT)
            assert r.returncode == 0 and " done: artifacts under " in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
            FIGURES["make pipeline BUILD=0 on box A"] = f"{seconds:.0f} s"
        finally:
            _make("down", env=env)
    return stack_data


@dataclass
class Pushed:
    lock: Path
    images: dict[str, tuple[str, str]]  # image -> (repo@digest, A's image id)
    log: str


@pytest.fixture(scope="module")
def pushed(engine, registry, tools, tmp_path_factory):
    lock = tmp_path_factory.mktemp("lock") / "images.lock"
    cert = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    env = _env(
        engine,
        tools,
        engine["DOCKER_HOST"],
        tmp_path_factory.mktemp("a-data"),
        REGISTRY=registry.name,
        IMAGES_LOCK=str(lock),
        SO8T_PIP_CERT=cert or "/etc/ssl/certs/ca-certificates.crt",
        DOCKER_BUILDKIT="1",
    )
    r, seconds = _make("push", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    FIGURES["make push (cached build + push)"] = f"{seconds:.0f} s, {_mb(_du(registry.storage))} in the registry"
    images = {image: (ref, iid) for image, ref, iid in (line.split() for line in lock.read_text().splitlines())}
    try:
        yield Pushed(lock, images, r.stdout + r.stderr)
    finally:  # A keeps its images; only the registry's names for them go (tags: the layers are shared)
        subprocess.run([DOCKER, "rmi", *images], env=engine, capture_output=True, timeout=120)


# ---- B's side -----------------------------------------------------------------------------------------------------


def _b_make(target: str, *args: str, env: dict[str, str], ok: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    r, seconds = _make(target, *args, env=env)
    B_LOGS.append(r.stdout + r.stderr)
    if ok:
        assert r.returncode == 0, f"make {target} on box B: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r, seconds


@pytest.fixture(scope="module")
def pulled(box_b, pushed, registry, tools, tmp_path_factory) -> str:
    env = _env(
        dict(os.environ),
        tools,
        box_b,
        tmp_path_factory.mktemp("b-pull"),
        REGISTRY=registry.name,
        IMAGES_LOCK=str(pushed.lock),
    )
    r, seconds = _b_make("pull", env=env)
    size = sum(int(_docker(env, "image", "inspect", "--format", "{{.Size}}", i)) for i in pushed.images)
    FIGURES["make pull on box B"] = f"{seconds:.0f} s, {_mb(size)} of images"
    return r.stdout


@pytest.fixture(scope="module")
def b_data(a_data, tmp_path_factory) -> Path:
    """Box B's data folder: a copy of A's (ownership kept: the stages run as uid 1000)."""
    dst = tmp_path_factory.mktemp("box-b") / "data"
    subprocess.run(["cp", "-a", str(a_data), str(dst)], check=True, timeout=600)
    return dst


def test_push_records_what_the_registry_serves(pushed, registry, engine):
    """make push: both images of the CPU stack under REGISTRY, each digest in the log and in IMAGES_LOCK, equal to
    the registry's own digest for the tag, each image id the one A holds under that name."""
    assert sorted(i.rsplit("/", 1)[1] for i in pushed.images) == ["so8t-converter:0.1.0", "so8t-cuda:0.1.0"]
    host, namespace = registry.name.split("/", 1)
    for image, (ref, iid) in pushed.images.items():
        assert f"pushed {image} = {ref} (image id {iid})" in pushed.log
        name, tag = image.removeprefix(f"{host}/").rsplit(":", 1)
        r = httpx.head(
            f"http://{host}/v2/{name}/manifests/{tag}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
            timeout=10,
        )
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == ref.split("@")[1], r.headers
        assert _docker(engine, "image", "inspect", "--format", "{{.Id}}", image).strip() == iid


def test_box_b_without_images_refuses_to_build(box_b, registry, tools, tmp_path):
    """BUILD=0 on a box that has no image yet: each target stops before anything starts, naming what is missing."""
    env = _env(dict(os.environ), tools, box_b, tmp_path / "data", REGISTRY=registry.name)
    cases = {
        "pipeline": ("so8t-cuda", "so8t-converter"),
        "up": ("so8t-converter",),
        "train": ("so8t-cuda",),
    }
    for target, names in cases.items():
        r, seconds = _b_make(target, "BUILD=0", env=env, ok=False)
        assert r.returncode != 0 and seconds < 60, (target, seconds, r.stdout, r.stderr)
        assert "BUILD=0 builds nothing" in r.stderr and "make pull" in r.stderr, r.stderr
        assert all(f"{registry.name}/{n}:0.1.0" in r.stderr for n in names), r.stderr
    assert _docker(env, "ps", "-aq") == "" and _docker(env, "images", "-q") == ""


def test_pull_gets_exactly_what_was_pushed(pulled, pushed, box_b):
    """make pull with A's IMAGES_LOCK: each image by the pushed digest, its image id A's, nothing else on B."""
    env = dict(os.environ, DOCKER_HOST=box_b)
    for image, (ref, iid) in pushed.images.items():
        assert f"pulled {image} = {ref} (image id {iid})" in pulled
        got = json.loads(_docker(env, "image", "inspect", image))[0]
        assert got["Id"] == iid and ref in got["RepoDigests"], got["RepoDigests"]
    tags = set(_docker(env, "images", "--format", "{{.Repository}}:{{.Tag}}").split())
    assert tags == set(pushed.images)


def test_one_stage_alone_on_box_b(pulled, registry, box_b, tools, a_data, b_data, tmp_path):
    """On B, BUILD=0: a stage whose upstream is missing fails at once naming it; with A's data, `make dataset`
    builds a fresh dataset id, the same records as A's."""
    env = _env(dict(os.environ), tools, box_b, tmp_path / "empty", REGISTRY=registry.name)
    r, seconds = _b_make("bake", "BUILD=0", env=env, ok=False)
    final = Layout(Path("/data")).run(RUN_ID).final / "manifest.json"
    assert r.returncode != 0 and seconds < 90, (seconds, r.stdout[-2000:], r.stderr[-2000:])
    assert f"bake gave up waiting after one look: no manifest yet at {final}" in r.stdout + r.stderr
    FIGURES["make bake alone, upstream missing"] = f"fails in {seconds:.1f} s"

    env = _env(dict(os.environ), tools, box_b, b_data, REGISTRY=registry.name)
    r, seconds = _b_make("dataset", "BUILD=0", "ARGS=--output /data/datasets/fresh", env=env)
    FIGURES["make dataset alone on box B"] = f"{seconds:.0f} s"
    fresh, ours = b_data / "datasets" / "fresh", a_data / "datasets" / "example"
    assert (fresh / "manifest.json").is_file()
    for split in ("train.jsonl", "val.jsonl"):
        assert (fresh / split).read_bytes() == (ours / split).read_bytes(), split
    assert {p.stat().st_uid for p in fresh.rglob("*")} == {int(UID)}


def test_up_through_ssh_serves_think_from_a_gguf(pulled, pushed, registry, box_b, ssh_b, b_data, tmp_path):
    """DOCKER_HOST=ssh://root@127.0.0.1:<port> (box B): make up BUILD=0 serves /think from A's Q4_K_M GGUF; then
    B has built nothing: no build in its logs, no build cache, only the pulled images, A's image ids."""
    host, bin_dir = ssh_b
    serving = serving_env(tmp_path / "state")  # made on B beforehand: make secrets cannot reach a remote engine's disk
    port = int(serving["THINK_API_PORT"])
    env = _env(dict(os.environ), bin_dir, host, b_data, REGISTRY=registry.name, **serving)
    assert _docker(env, "version", "--format", "{{.Server.Version}}").startswith("20.10")  # B, through ssh
    t0 = time.time()
    r, _ = _b_make("up", "BUILD=0", env=env)
    try:
        assert "BUILD=0: 1 image(s) on the engine, none built" in r.stderr, r.stderr
        _wait_for("the think API on box B", lambda: _healthy(port), 300)
        reply = httpx.post(f"http://127.0.0.1:{port}/think", json={"prompt": "2+2はいくつですか？"}, timeout=120)
        FIGURES["make up BUILD=0 through ssh to the first /think"] = f"{time.time() - t0:.0f} s"
        body = reply.json()
        assert reply.status_code in (200, 502) and "request_id" in body and "思考ステップ" not in json.dumps(body)
        ps, _ = _b_make("ps", env=env)
        assert "think-api" in ps.stdout and " Up " in ps.stdout, ps.stdout
        container = _docker(env, "ps", "-q", "--filter", "label=com.docker.compose.service=think-api").split()
        converter = next(v for k, v in pushed.images.items() if "so8t-converter" in k)
        assert _docker(env, "inspect", "--format", "{{.Image}}", *container).split() == [converter[1]]
    finally:
        _b_make("down", env=env, ok=False)
    _assert_b_built_nothing(env, pushed)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _assert_b_built_nothing(env: dict[str, str], pushed: Pushed) -> None:
    logs = "\n".join(B_LOGS)
    assert "Building" not in logs and "naming to" not in logs, logs[-3000:]
    df = [json.loads(line) for line in _docker(env, "system", "df", "--format", "{{json .}}").splitlines()]
    assert [d["TotalCount"] for d in df if d["Type"] == "Build Cache"] == ["0"], df
    ids = set(_docker(env, "images", "-q", "--no-trunc").split())
    assert ids == {iid for _, iid in pushed.images.values()}
