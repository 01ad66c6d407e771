"""bench/gpu.sh, known to work before a GPU is lent: its --dry-run runs the whole chain (random base, the training
rows of bench/trainer_vs_hf.py, the bake with its verification, the one table and its JSON) on the CPU at the tiny
size. Also the baker's choice of device for the verification forwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_sh_dry_run_runs_every_figure_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the script finds the repository itself
        timeout=1500,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    doc = json.loads((out / "gpu.json").read_text())
    assert doc["dry_run"] is True and doc["gpu"] == "none (CPU)"
    variants = [row["variant"] for row in doc["trainer"]["rows"]]
    assert variants == ["hf", "ours", "ours+gates", "ours+packing", "ours+gates+packing"]
    for row in doc["trainer"]["rows"]:
        assert row["timed_steps"] == 1 and row["real_tokens_per_s"] > 0 and row["lm_after"] > 0
        assert row["padding_share"] == 0.0 or not row["packing"].startswith("rows")
    assert doc["bake"]["passed"] and doc["bake"]["verify_device"] == "cpu"
    assert len(doc["table"]) == 7 and doc["table"][-1]["measurement"].startswith("bake bfloat16")
    assert doc["table"][5]["result"].startswith("gate overhead")
    printed = (out / "table.md").read_text()
    assert "| measurement | gates | packing | seconds | real tokens per s |" in printed
    assert "passed: max|Δlogit|" in printed
    assert not list(tmp_path.glob("so8t-gpu-bench.*"))  # the work directory is removed


def test_gpu_sh_refuses_to_run_without_cuda_unless_dry(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--dry-run" in r.stderr


def test_verification_device_is_the_cpu_without_cuda_and_can_be_forced(tiny_model_dir, monkeypatch):
    import torch

    from services.baker import verify

    monkeypatch.delenv(verify.DEVICE_ENV, raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert verify.choose_device(tiny_model_dir) == torch.device("cpu")
    monkeypatch.setenv(verify.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        verify.choose_device(tiny_model_dir)
    monkeypatch.setenv(verify.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="expected cpu or cuda"):
        verify.choose_device(tiny_model_dir)
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert verify.float32_bytes(tiny_model_dir) == 4 * n
