"""DDP: the same command under torchrun with two CPU processes (gloo) trains the tiny model, the ranks stay in
sync, and the result matches one process that accumulates the same global batch, with and without packing (with
packing each rank packs its own records, the single process all of them: other rows, the same update)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import REPO, tiny_train_config, trainer_cmd, write_dataset

from services.trainer.artifact import GATES as GATES_FILE
from shared.so8 import load_gates

pytestmark = pytest.mark.slow

STEPS = 4


def _settings(grad_accum: int, packing: bool = False) -> dict:
    return dict(
        train={
            "max_steps": STEPS,
            "seq_len": 1024 if packing else 320,
            "batch_size": 2 if packing else 1,  # packing: 2 records per rank and step, 4 in the single process
            "grad_accum": grad_accum,
            "num_threads": 1,
            "deterministic": True,
            "packing": packing,
        },
        lora={"dropout": 0.0},
        checkpoint={"save_steps": 2, "keep": 2, "save_minutes": None},
        logging={"log_steps": 1, "tensorboard": False},
    )


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, SO8T_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_two_gloo_processes_stay_in_sync_and_match_one_process(tmp_path, tiny_model_dir, packing):
    ds = write_dataset(tmp_path / "train.jsonl")
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "services.trainer",
    ]
    cmd = trainer_cmd(tiny_train_config(tmp_path / "ddp.yaml", **_settings(1, packing)), ds, ddp_out, tiny_model_dir)
    r = _run(torchrun + cmd[3:])
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((ddp_out / "final" / "manifest.json").read_text())
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["ddp_in_sync"] is True
    assert m["metrics"]["steps"] == STEPS
    state = json.loads((ddp_out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 2 * STEPS
    rng = torch.load(ddp_out / "checkpoints" / "checkpoint-4" / "training_state.pt", weights_only=True)["rng"]
    assert len(rng) == 2  # every rank's RNG state is in the checkpoint

    one = tiny_train_config(tmp_path / "one.yaml", **_settings(2, packing))
    r = _run(trainer_cmd(one, ds, single_out, tiny_model_dir))
    assert r.returncode == 0, r.stderr[-4000:]
    a = load_file(str(ddp_out / "final" / "adapter_model.safetensors"))
    b = load_file(str(single_out / "final" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    moved = max(
        (b[k] - load_file(str(ddp_out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))[k])
        .abs()
        .max()
        .item()
        for k in b
    )
    assert moved > 1e-4  # the comparison below is not between two untrained adapters
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"DDP and single-process adapters differ by {worst}"
    ga, _ = load_gates(ddp_out / "final" / GATES_FILE)
    gb, _ = load_gates(single_out / "final" / GATES_FILE)
    assert max((ga[i] - gb[i]).abs().max().item() for i in ga) < 1e-5
