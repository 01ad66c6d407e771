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
    assert len(doc["table"]) == 11 and doc["table"][-1]["measurement"].startswith("bake bfloat16")
    assert doc["table"][5]["result"].startswith("gate overhead")
    fits = [r["measurement"] for r in doc["table"][6:10]]
    assert fits == [
        f"fit {p}: one step on a {n}-token record, {m} checkpointing"
        for p, n in (("fast", 256), ("full", 512))
        for m in ("non-reentrant", "reentrant")
    ]  # records that really fill seq_len, both checkpointing modes
    assert [v.split(":")[0] for v in doc["verdicts"]] == [
        "fast (seq 256, r 8, 1 gated layers)",
        "full (seq 512, r 16, 2 gated layers)",
    ]
    assert all("fits 12 GB: n/a (no GPU)" in v for v in doc["verdicts"])
    assert doc["seconds"] > 0 and "bench/gpu.sh took" in (out / "table.md").read_text()
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
    place = verify.plan_placement(tiny_model_dir)
    assert place.device == torch.device("cpu") and not place.split and place.load_kwargs() == {}
    monkeypatch.setenv(verify.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        verify.plan_placement(tiny_model_dir)
    monkeypatch.setenv(verify.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="expected cpu or cuda"):
        verify.plan_placement(tiny_model_dir)
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert verify.float32_bytes(tiny_model_dir) == 4 * n


def test_a_split_placement_loads_with_a_gpu_and_a_host_budget():
    import torch

    from services.baker.verify import Placement

    place = Placement(torch.device("cuda", 0), 10 << 30, 6 << 30)
    assert place.split
    kwargs = place.load_kwargs()
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"][0] == 10 << 30
    assert kwargs["max_memory"]["cpu"] > 6 << 30  # the weights beyond the GPU, plus slack
    assert Placement(torch.device("cuda", 0), 10 << 30, 0).load_kwargs() == {
        "device_map": {"": torch.device("cuda", 0)}
    }
