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

import json
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from services.pipeline.config import PipelineConfig
from services.trainer import artifact
from shared.config import load_config
from shared.layout import Layout

pytest.register_assert_rewrite("stack_fixtures")  # before its import here, as pytest_plugins would
from stack_fixtures import PROFILE, UID, Stack, cpu_engine  # noqa: E402

# the engine with the images (session-wide, shared with the deploy test), the data folder, the test order
pytest_plugins = ["stack_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.stack]


@pytest.fixture(scope="module")
def reference(tiny_chain) -> dict:
    """The same profile's training, native and uninterrupted (the session's tiny chain)."""
    return _tensors(Layout(tiny_chain[0]).run(load_config(PipelineConfig, PROFILE).run_id).final)


def _tensors(final: Path) -> dict:
    out = {f"adapter:{k}": v for k, v in load_file(str(final / artifact.ADAPTER_WEIGHTS)).items()}
    out |= {f"gates:{k}": v for k, v in load_file(str(final / artifact.GATES)).items()}
    return out


def _engine(action: str, env: dict[str, str]) -> None:
    r = cpu_engine(action, env)
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
def data(stack_data) -> Path:
    return stack_data


def test_power_cut_while_training(engine, reference, data):
    """On a fresh data folder with the shipped example input: the whole chain, cut while the trainer trains."""
    _exercise(Stack("so8t-cut", data, engine), "power-cut", reference)


def test_orderly_shutdown_while_training(engine, reference, data):
    """The same data folder with the run removed (the dataset and the tiny base stay, skipped by their manifests):
    the chain again, stopped in an orderly way while the trainer trains."""
    import shutil

    shutil.rmtree(Layout(data).run(load_config(PipelineConfig, PROFILE).run_id).root, ignore_errors=True)
    _exercise(Stack("so8t-stop", data, engine), "stop", reference)
