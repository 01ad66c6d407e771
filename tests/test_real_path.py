"""The real path's defects, shown on the CPU where their cause can be: the process group of a GPU DDP run, int8
inputs kept alive by non-reentrant checkpointing, bitsandbytes' per-matmul warning, a CUDA profile on the CPU, the
GPU hidden from the suite, the rotation cache after an optimizer step, validation's autocast, the CUDA RNG of the
process's own device, bf16 without native support, torchrun in the stack."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_trainer import REPO, sft_records, tiny_train_config, trainer_cmd, write_dataset


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, SO8T_PROGRESS="0", OMP_NUM_THREADS="1", **extra)


# --- 1: torchrun on GPUs: CPU tensors need a backend too ----------------------------------------------------------


def test_the_gpu_process_group_has_a_backend_for_cpu_tensors():
    from torch.distributed.distributed_c10d import BackendConfig

    from services.trainer.distributed import backend

    # the loop all-reduces its figures as a CPU tensor: an NCCL-only group has no backend for it in torch 2.13
    assert BackendConfig(backend(cuda=True)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert BackendConfig(backend(cuda=False)).get_device_backend_map()["cpu"] == "gloo"


# --- 5: the suite never touches a GPU ------------------------------------------------------------------------------


def test_the_suite_and_its_subprocesses_see_no_gpu():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    code = "import torch; print(torch.cuda.device_count(), torch.cuda.is_available())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["0", "False"]


# --- 2: k-bit base + gradient checkpointing ------------------------------------------------------------------------


def _kbit_objective(tiny_model_dir, reentrant: bool | None, quantization: str = "8bit"):
    from services.trainer import model as mdl
    from services.trainer.config import LoraSection, ModelSection
    from services.trainer.gates import attach_gates
    from services.trainer.objective import Objective

    cfg = ModelSection(
        base_model=str(tiny_model_dir),
        quantization=quantization,
        precision="fp32",
        gradient_checkpointing=True,
        attn_implementation="eager",
    )
    if reentrant is not None:  # the setting under test, forced (None: what load_base chooses)
        orig = mdl.checkpointing_kwargs
        mdl.checkpointing_kwargs = lambda _cfg: {"use_reentrant": reentrant}
    try:
        base = mdl.load_base(cfg, str(tiny_model_dir), torch.device("cpu"))
    finally:
        if reentrant is not None:
            mdl.checkpointing_kwargs = orig
    model = mdl.add_lora(base, LoraSection(r=4, alpha=8, dropout=0.0), str(tiny_model_dir), seed=0)
    gates = attach_gates(model, None, None, 0.05, seed=0)
    model.train()
    return Objective(model, gates, True, 0.0), model, gates


def _int8_nodes(loss: torch.Tensor) -> int:
    """bitsandbytes int8 matmul nodes in the autograd graph (MatMul8bitLt on CUDA, its CPU twin MatMul8bitFp): each
    holds its layer's input on ctx, outside the saved-tensor hooks, until backward."""
    seen, todo, n = set(), [loss.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += type(fn).__name__.startswith("MatMul8bit")
        todo.extend(f for f, _ in fn.next_functions)
    return n


def _batch(tok):
    from services.trainer.data import assistant_spans, collate, tokenize

    exs = [tokenize(tok, *assistant_spans(r, "x"), 256) for r in sft_records(2)]
    return collate(exs, tok.pad_token_id)


def test_kbit_checkpointing_keeps_no_int8_input_alive_and_gives_the_same_gradients(tiny_model_dir, tiny_tokenizer):
    from services.trainer.gates import StepRotations

    ids, mask, labels = _batch(tiny_tokenizer)
    grads, alive = {}, {}
    for mode in (None, False):  # None: the trainer's choice (reentrant for k-bit), False: what it used to do
        torch.manual_seed(0)
        objective, model, gates = _kbit_objective(tiny_model_dir, mode)
        rotations = objective.step = StepRotations(gates)  # as the trainer's step: R once, a leaf per step
        lm_sum, pet, _, _ = objective(ids, mask, labels)
        loss = lm_sum / 100 + 0.01 * pet
        alive[mode] = _int8_nodes(loss)
        loss.backward()
        rotations.backward(1e-4)
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert alive[False] > 0  # non-reentrant: every int8 layer's input is held until backward
    assert alive[None] == 0  # reentrant: the forward ran under no_grad, nothing held
    assert grads[None].keys() == grads[False].keys() and any("so8t_gate" in n for n in grads[None])
    for name, g in grads[None].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_unquantised_bases_keep_non_reentrant_checkpointing():
    from services.trainer.config import ModelSection
    from services.trainer.model import checkpointing_kwargs

    assert checkpointing_kwargs(ModelSection(quantization="none")) == {"use_reentrant": False}
    assert checkpointing_kwargs(ModelSection(quantization="4bit")) == {"use_reentrant": True}


# --- 3 + 4: an 8-bit profile on the CPU: refused without --allow-cpu; with it, a readable log ----------------------


def test_a_cuda_profile_is_refused_on_the_cpu_with_the_reason(tmp_path, tiny_model_dir):
    ds = write_dataset(tmp_path / "train.jsonl")
    cmd = trainer_cmd(
        REPO / "configs" / "train" / "full.yaml", ds, tmp_path / "out", tiny_model_dir, "--max-steps", "1"
    )
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "needs a CUDA device (model.quantization: 8bit; model.precision: bf16)" in r.stderr
    from services.trainer.device import why_no_cuda

    # a CPU build of torch here; "CUDA_VISIBLE_DEVICES is set and empty" with the CUDA build on a GPU box
    assert why_no_cuda() in r.stderr and "--allow-cpu" in r.stderr
    assert "torch 2." in r.stderr and "device cpu" in r.stderr  # versions and device said at start
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_an_8bit_run_allowed_on_the_cpu_trains_with_a_readable_log(tmp_path, tiny_model_dir):
    ds = write_dataset(tmp_path / "train.jsonl")
    write_dataset(tmp_path / "val.jsonl", sft_records(2))
    cfg = tiny_train_config(
        tmp_path / "8bit.yaml",
        model={"quantization": "8bit", "precision": "bf16", "gradient_checkpointing": True},
        train={"max_steps": 2, "grad_accum": 2, "eval_steps": 1},
        checkpoint={"save_steps": 1},
    )
    cmd = trainer_cmd(cfg, ds, tmp_path / "out", tiny_model_dir, "--allow-cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    cast = [line for line in lines if "MatMul8bitLt: inputs will be cast" in line]
    # bitsandbytes warns on every int8 matmul in eval mode (on the CPU, training uses its MatMul8bitFp): 2 validation
    # passes x 2 records x 2 layers x 4 int8 layers = 32 warnings without the filter
    assert len(cast) == 1 and "shown once" in cast[0], len(cast)
    assert len(lines) < 60, "\n".join(lines)
    assert "Loading weights" not in r.stderr  # transformers' per-tensor bar is off in a log
    assert any("--allow-cpu: model.quantization: 8bit, model.precision: bf16 on the CPU" in line for line in lines)
    assert (tmp_path / "out" / "final" / "manifest.json").is_file()


# --- 11: no rotation computed before an optimizer step is applied after it ------------------------------------------


def _run_with_validation(tmp_path, tiny_model_dir):
    """A tiny training session (not started) with validation every step, in this process."""
    from services.trainer.config import TrainConfig
    from services.trainer.distributed import Dist
    from services.trainer.loop import Run
    from shared.config import load_config

    ds = write_dataset(tmp_path / "train.jsonl")
    write_dataset(tmp_path / "val.jsonl", sft_records(2))
    cfg = load_config(
        TrainConfig,
        tiny_train_config(tmp_path / "t.yaml", train={"max_steps": 2, "eval_steps": 1}),
        {"model.base_model": str(tiny_model_dir)},
    )
    return Run(cfg, ds, tmp_path / "out", Dist(0, 1, 0, torch.device("cpu")), tmp_path / "val.jsonl")


def test_no_rotation_outlives_an_optimizer_step_or_a_validation_pass(tmp_path, tiny_model_dir):
    from services.trainer.gates import precompute_rotations

    run = _run_with_validation(tmp_path, tiny_model_dir)
    s = run.build()
    # bitsandbytes' optimizers write A through a raw pointer: A._version does not move, so a cached rotation of
    # the old A would be applied to the new one. Shown here with a write through .data:
    gate = next(iter(s.gates.values()))
    precompute_rotations(s.gates)
    stale = gate.current_rotation().clone()
    gate.A.data.add_(0.5)
    assert torch.equal(gate.current_rotation(), stale)  # the version guard alone cannot see it
    run.step(s, 0, 0)
    assert all(g._given is None for g in s.gates.values())  # cleared after the step
    s.validation.run(s.objective, 1)
    assert all(g._given is None for g in s.gates.values())  # and after validation


# --- 10: validation computes in the training forwards' precision ---------------------------------------------------


def test_validation_runs_under_the_training_autocast(tmp_path, tiny_model_dir):
    from services.trainer.loop import Precision

    run = _run_with_validation(tmp_path, tiny_model_dir)
    # what a bf16 CUDA run sets up, on the CPU's autocast
    run._setup_precision = lambda: Precision("cpu", torch.bfloat16, None)  # type: ignore[method-assign]
    s = run.build()
    seen = []
    qkv = s.peft.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer
    qkv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    s.validation.run(s.objective, 1)
    assert seen and set(seen) == {torch.bfloat16}


# --- 12 + 13: CUDA state of the process's own device; bf16 without native support --------------------------------


def test_checkpoints_hold_the_cuda_rng_of_the_own_device_only(monkeypatch):
    from services.trainer import checkpoint

    own, every = torch.tensor([1], dtype=torch.uint8), [torch.tensor([7], dtype=torch.uint8)] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: every)
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], own)  # one tensor, not every visible device's
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": restored.append(t))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    checkpoint.set_rng_state(state)
    checkpoint.set_rng_state(dict(state, cuda=every[:2]))  # an older checkpoint: every device's states
    checkpoint.set_rng_state(dict(state, cuda=every[:1]))  # written with fewer GPUs than this process's index
    assert [int(t[0]) for t in restored] == [1, 7]


def test_bf16_on_a_card_without_native_bf16_computes_in_fp16(monkeypatch):
    from services.trainer.config import ModelSection
    from services.trainer.model import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda", 0)
    assert compute_dtype(ModelSection(precision="bf16"), cuda) == torch.float16
    assert compute_dtype(ModelSection(precision="fp32"), cuda) == torch.float32
    assert compute_dtype(ModelSection(precision="bf16"), torch.device("cpu")) == torch.float32


# --- 8: the stack trains on every GPU it reserves ------------------------------------------------------------------


def test_the_stack_runs_the_trainer_under_torchrun_for_several_gpus(tmp_path):
    from services.pipeline.plan import trainer
    from shared.errors import InputError

    assert trainer(["--x"], "1") == (sys.executable, "-m", "services.trainer", "--x")
    two = trainer(["--help"], "2")
    assert two[:5] == (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    assert trainer([], "all")[4] == "--nproc-per-node=gpu"
    with pytest.raises(InputError, match="SO8T_GPUS='two'"):
        trainer([], "two")
    # the command really launches two trainer processes (here each prints its --help)
    r = subprocess.run(list(two), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("usage: python -m services.trainer") == 2 and "--allow-cpu" in r.stdout


# --- the eval stage without CUDA: a Hugging Face base through llama.cpp, converted once ----------------------------


def test_without_cuda_the_eval_asks_a_hf_model_as_a_gguf_converted_once(tiny_model_dir, tmp_path, monkeypatch):
    from services.converter import hf_to_gguf
    from services.eval.models import GGUFGenerator, HFGenerator, ModelSpec, open_generator

    try:
        hf_to_gguf.converter_script()
    except hf_to_gguf.ConvertError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = ModelSpec.parse(f"base=hf:{tiny_model_dir}")
    gen = open_generator(spec, 512, 0, 1, "gguf")
    assert isinstance(gen, GGUFGenerator)
    cached = list((tmp_path / "hf" / "so8t-gguf").glob("*-F16.gguf"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".*.tmp"))
    prompt = "<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    got = gen.generate(prompt, 8)
    gen.close()
    stamp = cached[0].stat().st_mtime_ns
    again = open_generator(spec, 512, 0, 1, "gguf")  # the second model or run reuses the file
    assert again.generate(prompt, 8).text == got.text and cached[0].stat().st_mtime_ns == stamp
    again.close()
    assert isinstance(open_generator(spec, 512, 0, 1, "transformers"), HFGenerator)
