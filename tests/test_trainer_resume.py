"""Power-loss recovery, with real processes: a tiny run SIGKILLed at random instants, in the middle of a
checkpoint write and in the middle of the final write, restarted each time, ends bitwise equal (adapter and
gates) to an uninterrupted run; a truncated tensor file in the newest checkpoint is detected and the run
resumes from the one before.

Kills mid-write use the trainer's test hook $SO8T_FAULT (the process SIGKILLs itself at a named point), so
they are certain to land inside the write; the other kills are timed at random by this test.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import REPO, sft_records, tiny_train_config, trainer_cmd, write_dataset

from services.trainer.artifact import GATES as GATES_FILE
from shared.so8 import load_gates

pytestmark = pytest.mark.slow

TOTAL = 12
SETTINGS = dict(
    train={
        "max_steps": TOTAL,
        "seq_len": 384,
        "batch_size": 2,
        "grad_accum": 2,
        "num_threads": 1,
        "deterministic": True,
        "eval_steps": 3,  # validation on val.jsonl beside the train file: it must change nothing
        "eval_generate_records": 2,  # nor must its greedy replies
        "eval_generate_tokens": 24,
    },
    lora={"dropout": 0.1},  # dropout draws from the RNG: its state must come back exactly
    checkpoint={"save_steps": 2, "keep": 2, "save_minutes": None},
    logging={"log_steps": 1, "tensorboard": False},
)


def _env(fault: str | None = None) -> dict:
    env = dict(os.environ, SO8T_PROGRESS="0", PYTHONUNBUFFERED="1")
    env.pop("SO8T_FAULT", None)
    if fault:
        env["SO8T_FAULT"] = fault
    return env


def _run(cmd: list[str], log: Path, fault: str | None = None) -> int:
    with open(log, "w") as fh:
        return subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(fault), cwd=REPO, timeout=300
        ).returncode


def _final_tensors(final: Path) -> dict[str, torch.Tensor]:
    out = {f"adapter:{k}": v for k, v in load_file(str(final / "adapter_model.safetensors")).items()}
    gates, _ = load_gates(final / GATES_FILE)
    out.update({f"gate:{i}": A for i, A in gates.items()})
    return out


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ from the uninterrupted run: {differ[:5]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    ds = write_dataset(root / "train.jsonl")
    write_dataset(root / "val.jsonl", sft_records(6)[::-1])
    cfg = tiny_train_config(root / "resume.yaml", **SETTINGS)
    ref = root / "reference"
    tb_cfg = tiny_train_config(root / "reference.yaml", **dict(SETTINGS, logging={"log_steps": 1, "tensorboard": True}))
    rc = _run(trainer_cmd(tb_cfg, ds, ref, tiny_model_dir), root / "reference.log")
    assert rc == 0, (root / "reference.log").read_text()[-3000:]
    return {
        "root": root,
        "ds": ds,
        "cfg": cfg,
        "base": tiny_model_dir,
        "ref": _final_tensors(ref / "final"),
        "ref_dir": ref,
        "ref_validation": json.loads((ref / "final" / "manifest.json").read_text())["metrics"]["validation"],
    }


def test_reference_run_writes_the_contract_artifact(setup):
    ref = setup["ref_dir"]
    final = ref / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        GATES_FILE,
    ]
    m = json.loads((final / "manifest.json").read_text())
    assert m["stage"] == "train" and m["base_model"] == str(setup["base"]) and m["base_model_sha256"]
    assert m["lora"] == {
        "r": 16,
        "alpha": 32.0,
        "dropout": 0.1,
        "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    }
    assert m["gates"] == {"layer_indices": [0, 1], "init_scale": 0.05, "hidden_size": 256}
    assert m["quantization"] == "none" and m["metrics"]["steps"] == TOTAL
    assert m["inputs"]["dataset"]["sha256"] and set(m["metrics"]["final_losses"]) == {"total", "lm", "pet", "ortho"}
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(setup["base"]) and cfg["r"] == 16
    gates, meta = load_gates(final / GATES_FILE)
    assert sorted(gates) == [0, 1] and gates[0].shape == (32, 8, 8) and meta["hidden_size"] == "256"
    session = json.loads((ref / "training_session.json").read_text())
    assert session["status"] == "completed" and session["step"] == session["total_steps"] == TOTAL
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-12"]  # keep 2
    assert list((ref / "tensorboard").glob("events.out.tfevents.*"))
    log = (setup["root"] / "reference.log").read_text()
    # the λ schedule on 12 steps: updates 0-2 exploration (< 20%), 3-7 transition (< 60%), 8-11 stabilisation;
    # the log counts updates from 1
    phases = {int(n): (float(lam), name) for n, lam, name in re.findall(r"step (\d+)/12 .*? λ ([\d.]+) \((\w+)\)", log)}
    assert sorted(phases) == list(range(1, 13))
    val = m["metrics"]["validation"]
    assert [h["step"] for h in val["history"]] == [3, 6, 9, 12] and val["last"] == val["history"][-1]
    assert val["best"]["lm"] == min(h["lm"] for h in val["history"]) and val["records"] == 6
    assert val["history"][-1]["lm"] < val["history"][0]["lm"]  # it trains on the same kind of text
    assert len(re.findall(r"step \d+/12 validation: lm [\d.]+", log)) == 4
    assert len(re.findall(r"step \d+/12 replies: format [\d.]+, verdict right [\d.]+", log)) == 4
    assert all(h["generated"] == 2 and 0 <= h["format"] <= 1 and 0 <= h["label_accuracy"] <= 1 for h in val["history"])
    assert val["generate_records"] == 2
    assert [phases[n] for n in (3, 4, 8, 9)] == [
        (0.01, "exploration"),
        (0.05, "transition"),
        (0.05, "transition"),
        (0.1, "stabilisation"),
    ]


def _kill_at_random(cmd: list[str], out: Path, log: Path, rng: random.Random, env_fault: str | None = None) -> bool:
    """Start a run, wait until it trains, SIGKILL it after a random delay; True if it was killed alive."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(env_fault), cwd=REPO)
        session = out / "training_session.json"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(session.read_text()).get("pid") == proc.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return alive


def test_sigkill_at_any_instant_then_restart_ends_bitwise_equal(setup):
    root, ds, base = setup["root"], setup["ds"], setup["base"]
    out = root / "killed"
    cmd = trainer_cmd(setup["cfg"], ds, out, base)
    # 1. killed while checkpoint-4 is being written: files there, completion marker not yet
    assert _run(cmd, root / "k1.log", fault="checkpoint-write:4") == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".checkpoint-4.")], "no half-written checkpoint"
    assert not (ckpts / "checkpoint-4").exists() and (ckpts / "checkpoint-2" / "checkpoint.json").is_file()
    # 2-3. killed at random instants (a time-based save every ~0.1 s adds checkpoints at arbitrary steps)
    rng = random.Random(int(os.environ.get("SO8T_TEST_SEED", "1234")))
    fast_saves = tiny_train_config(
        root / "fast-saves.yaml", **dict(SETTINGS, checkpoint={"save_steps": 2, "keep": 2, "save_minutes": 0.002})
    )
    kills = [
        _kill_at_random(cmd, out, root / "k2.log", rng),
        _kill_at_random(trainer_cmd(fast_saves, ds, out, base), out, root / "k3.log", rng),
    ]
    k2 = (root / "k2.log").read_text()
    assert "removed incomplete checkpoint leftover .checkpoint-4." in k2 and "resuming from checkpoint-2" in k2
    # 4. killed while the final artifact is being written
    rc = _run(cmd, root / "k4.log", fault="final-write")
    assert rc in (-signal.SIGKILL, 0)  # 0 only if a random kill above came after the run had finished
    if rc == -signal.SIGKILL:
        assert not (out / "final").exists()
    # 5. the restart completes
    assert _run(cmd, root / "k5.log") == 0, (root / "k5.log").read_text()[-3000:]
    _assert_bitwise_equal(_final_tensors(out / "final"), setup["ref"])
    # the validation history came back from the checkpoints: the same figures as the uninterrupted run's
    assert json.loads((out / "final" / "manifest.json").read_text())["metrics"]["validation"] == setup["ref_validation"]
    assert any(kills), "no random kill hit a live process"
    session = json.loads((out / "training_session.json").read_text())
    assert session["status"] == "completed" and session["step"] == TOTAL


def test_truncated_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous(setup):
    root, ds, base = setup["root"], setup["ds"], setup["base"]
    out = root / "corrupt"
    cmd = trainer_cmd(setup["cfg"], ds, out, base)
    assert _run(cmd, root / "c1.log", fault="checkpoint-done:8") == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    tensor = ckpts / "checkpoint-8" / "adapter_model.safetensors"
    size = tensor.stat().st_size
    with open(tensor, "r+b") as fh:
        fh.truncate(size // 2)
    assert _run(cmd, root / "c2.log") == 0, (root / "c2.log").read_text()[-3000:]
    log = (root / "c2.log").read_text()
    assert (
        f"checkpoint-8 failed verification: adapter_model.safetensors is {size // 2} bytes, the marker says "
        f"{size} (truncated or corrupted)"
    ) in log
    assert "resuming from checkpoint-6: step 6/12" in log
    assert (ckpts / "checkpoint-8.corrupt").is_dir()
    _assert_bitwise_equal(_final_tensors(out / "final"), setup["ref"])
    # a rerun with nothing changed is skipped; --fresh is not needed to notice that
    before = (out / "final" / "manifest.json").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0 and "up to date" in r.stdout and (out / "final" / "manifest.json").read_text() == before


def test_checkpoint_from_another_config_is_not_resumed(setup, tmp_path):
    root, ds, base = setup["root"], setup["ds"], setup["base"]
    out = root / "other"
    cmd = trainer_cmd(setup["cfg"], ds, out, base)
    assert _run(cmd, root / "o1.log", fault="checkpoint-done:2") == -signal.SIGKILL
    changed = tiny_train_config(tmp_path / "changed.yaml", **dict(SETTINGS, optim={"lr": 1e-4}))
    r = subprocess.run(
        trainer_cmd(changed, ds, out, base), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120
    )
    assert r.returncode == 2 and "checkpoint-2 belongs to another run (differs in training_digest)" in r.stderr
    assert "--fresh" in r.stderr


def test_validation_changes_nothing_about_the_trajectory(setup, tmp_path):
    """The same run without validation ends with bitwise the same adapter and gates."""
    cfg = tiny_train_config(tmp_path / "noval.yaml", **dict(SETTINGS, train={**SETTINGS["train"], "eval_steps": None}))
    out = tmp_path / "noval"
    assert _run(trainer_cmd(cfg, setup["ds"], out, setup["base"]), tmp_path / "noval.log") == 0
    _assert_bitwise_equal(_final_tensors(out / "final"), setup["ref"])
    assert json.loads((out / "final" / "manifest.json").read_text())["metrics"]["validation"] is None


def test_packed_run_killed_after_a_checkpoint_resumes_bitwise(tmp_path, tiny_model_dir):
    """train.packing: each step's records packed into rows (dropout on, so the RNG state must come back exactly);
    killed right after checkpoint-4 and in the middle of checkpoint-6, restarted, it ends bitwise where an
    uninterrupted packed run ends."""
    ds = write_dataset(tmp_path / "train.jsonl")
    packed = dict(
        SETTINGS,
        train={**SETTINGS["train"], "max_steps": 8, "seq_len": 1024, "packing": True, "eval_steps": None},
    )
    cfg = tiny_train_config(tmp_path / "packed.yaml", **packed)
    ref = tmp_path / "reference"
    assert _run(trainer_cmd(cfg, ds, ref, tiny_model_dir), tmp_path / "ref.log") == 0
    out = tmp_path / "killed"
    cmd = trainer_cmd(cfg, ds, out, tiny_model_dir)
    assert _run(cmd, tmp_path / "k1.log", fault="checkpoint-done:4") == -signal.SIGKILL
    assert _run(cmd, tmp_path / "k2.log", fault="checkpoint-write:6") == -signal.SIGKILL
    assert _run(cmd, tmp_path / "k3.log") == 0, (tmp_path / "k3.log").read_text()[-3000:]
    assert "resuming from checkpoint-4: step 4/8" in (tmp_path / "k3.log").read_text()
    _assert_bitwise_equal(_final_tensors(out / "final"), _final_tensors(ref / "final"))
    assert "packed into rows of at most 1024 tokens" in (tmp_path / "ref.log").read_text()
