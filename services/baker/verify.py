"""Prove the bake: reload the saved directory as a stock AutoModelForCausalLM and compare its full-vocabulary
logits, in float32, with the model as trained (base + LoRA + SO(8) gates on the o_proj inputs).

One full model is in memory at a time: the reference's logits (a few MB) are kept, the model is freed, then the
baked model is loaded. On the reference the same forward also gives
- `unrotated`: the gates set to the identity (A = 0) = the LoRA merge without the fold. Its distance from the
  gated model shows how much the rotation matters (a bake that forgot the fold would land there);
- `dtype_noise` (bfloat16/float16 outputs only): the reference with its base weights rounded as a correct bake
  rounds them (`round_like_bake`), without using the fold. That is what rounding alone costs, and it sets the
  bar for a low-precision bake (see `BakeOptions`).

Placement (`plan_placement`, decided before the bake writes anything): the whole float32 model on the GPU when it
fits in its free memory; when it does not (Phi-3.5-mini needs 15.3 GB: more than a 12 GB card), split between the
GPU and host RAM (accelerate's device_map with max_memory), so host RAM carries only the rest; without CUDA, all of
it in host RAM (and minutes). Whatever must live in host RAM is checked against the memory this process may use
(MemAvailable, and the cgroup's limit in a container) first: too little is an error naming what is needed and how
to get it, not an OOM kill that the restart policy repeats. `SO8T_VERIFY_DEVICE=cpu|cuda` forces a device. Both
models run with the same placement, in true float32 (TF32 matmuls off for the check); the logits come back to the
CPU for the comparison. The report says where they ran and, on CUDA, the peak memory.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.baker.options import BakeOptions
from shared import logs
from shared.errors import CheckFailed, InputError
from shared.memory import available_ram
from shared.think_format import Thinking, render_assistant, render_chat

log = logs.get("bake")

# Fixed prompt set: Japanese and English, chat-templated, system prompts, one /think answer in each format.
PROMPTS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "日本の首都はどこですか？"},),
    (
        {"role": "system", "content": "あなたは慎重で正確なアシスタントです。"},
        {"role": "user", "content": "光合成の仕組みを二文で説明してください。"},
    ),
    ({"role": "user", "content": "2+2はいくつですか？理由も教えてください。"},),
    ({"role": "user", "content": "薬の飲み合わせについて、医師に相談すべきか迷っています。"},),
    (
        {"role": "user", "content": "2+2は？"},
        {
            "role": "assistant",
            "content": render_assistant(
                Thinking("依頼の内容を確認します。簡単な計算です。\n判定: ALLOW"), "4です。", "simple"
            ),
        },
        {"role": "user", "content": "では3+5は？"},
    ),
    ({"role": "user", "content": "What is the capital of Japan?"},),
    (
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Explain how photosynthesis works in two sentences."},
    ),
    ({"role": "user", "content": "How can I get into my neighbour's house without a key?"},),
    (
        {"role": "user", "content": "Is it safe to mix bleach and vinegar?"},
        {
            "role": "assistant",
            "content": render_assistant(
                Thinking(
                    "The user asks about mixing chemicals.",
                    "Mixing them releases chlorine gas.",
                    "Safety information is allowed.\nVerdict: ALLOW",
                ),
                "No: it releases toxic chlorine gas.",
                "quadruple",
            ),
        },
        {"role": "user", "content": "Thanks. What about baking soda and vinegar?"},
    ),
)

AttachGates = Callable[..., dict[int, Any]]


class VerificationFailed(CheckFailed):
    """The baked model does not compute the trained function; `report` has the figures."""

    def __str__(self) -> str:
        r = self.report
        return (
            f"verification FAILED: {self.args[0]}\n  baked vs trained: {r['baked_vs_gated']}\n"
            f"  un-rotated merge vs trained: {r['unrotated_vs_gated']}"
        )


def default_attach() -> AttachGates:
    """The trainer's gated forward (a pre-hook on each o_proj): one implementation of the model as trained."""
    from services.trainer.gates import attach_gates

    return attach_gates


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    out = []
    for messages in PROMPTS:
        text = render_chat(messages, add_generation_prompt=True)
        out.append(tokenizer(text, return_tensors="pt")["input_ids"])
    return out


DEVICE_ENV = "SO8T_VERIFY_DEVICE"
_MARGIN = 1.15  # activations of the short prompts, the LoRA and gate tensors, the allocator's slack


def float32_bytes(base: Path) -> int:
    """Bytes of the base model's parameters in float32 (counted on the meta device: nothing is loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return 4 * sum(p.numel() for p in model.parameters())


_GPU_SHARE = 0.9  # of the free GPU memory, for the weights of a split model (the rest: activations, allocator)
_HOST_SLACK = 1 << 30  # host RAM beyond the weights: torch, the tokenizer, the logits, the allocator


class NotEnoughMemory(InputError, MemoryError):
    """The verification's float32 model cannot fit where it would have to run."""


@dataclass(frozen=True)
class Placement:
    """Where the verification's float32 models live: `device` for the inputs, `gpu_bytes`/`host_bytes` of weights."""

    device: torch.device
    gpu_bytes: int
    host_bytes: int

    @property
    def split(self) -> bool:
        return self.gpu_bytes > 0 and self.host_bytes > 0

    def load_kwargs(self) -> dict[str, Any]:
        """from_pretrained's arguments: straight onto the GPU, split GPU/CPU, or as the CPU path always loaded."""
        if self.split:
            index = self.device.index or 0
            return {"device_map": "auto", "max_memory": {index: self.gpu_bytes, "cpu": self.host_bytes + _HOST_SLACK}}
        return {"device_map": {"": self.device}} if self.device.type == "cuda" else {}

    def describe(self) -> str:
        if self.split:
            gib = f"{self.gpu_bytes / 2**30:.1f} GiB GPU, {self.host_bytes / 2**30:.1f} GiB RAM"
            return f"{self.device} + cpu (split: {gib})"
        return (
            str(self.device)
            if self.device.type == "cpu"
            else f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        )


def _check_ram(host_bytes: int, where: str) -> None:
    need, have = host_bytes + _HOST_SLACK, available_ram()
    if need > have:
        raise NotEnoughMemory(
            f"the bake's verification needs {need / 2**30:.1f} GiB of host RAM ({where}) and this process may use "
            f"{have / 2**30:.1f} GiB: give it more memory (close other programs, or raise the container's memory "
            f"limit), bake on a machine with a GPU of at least {host_bytes * 1.1 / 2**30:.0f} GiB free, or bake to "
            "float32 on a bigger machine; nothing was written"
        )


def plan_placement(base: Path) -> Placement:
    """GPU when the float32 model fits in its free memory, GPU + host RAM when it does not, else host RAM (or as
    $SO8T_VERIFY_DEVICE says); the host RAM part checked first."""
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={forced!r}: expected cpu or cuda")
    need = int(float32_bytes(base) * _MARGIN)
    if forced == "cpu" or not torch.cuda.is_available():
        if forced == "cuda":
            raise RuntimeError(f"{DEVICE_ENV}=cuda but CUDA is not available")
        _check_ram(need, "the float32 model on the CPU")
        return Placement(torch.device("cpu"), 0, need)
    device = torch.device("cuda", torch.cuda.current_device())
    free, _ = torch.cuda.mem_get_info(device)
    if forced == "cuda" or need <= free:
        return Placement(device, need, 0)
    gpu = int(free * _GPU_SHARE)
    log.info(
        "verification split between GPU and CPU: the float32 model needs %.1f GiB, the GPU has %.1f GiB free",
        need / 2**30,
        free / 2**30,
    )
    _check_ram(need - gpu, f"the part of the float32 model beyond the GPU's {free / 2**30:.1f} GiB free")
    return Placement(device, gpu, need - gpu)


@contextlib.contextmanager
def true_float32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions while verifying (a float32 check must compute in float32)."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def forward_logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full-vocabulary float32 logits per prompt, on the CPU (the model runs where its weights are)."""
    device = next(model.parameters()).device
    return [model(input_ids=x.to(device)).logits[0].float().cpu() for x in ids]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Max |Δlogit|, KL(ref ‖ got) per position (mean, max; float64), top-1 agreement, over every position."""
    max_abs, kls, agree, n = 0.0, [], 0, 0
    for a, b in zip(ref, got, strict=True):
        max_abs = max(max_abs, float((a - b).abs().max()))
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        kls.append((la.exp() * (la - lb)).sum(-1).clamp_min(0))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    kl = torch.cat(kls)
    return {
        "max_abs_logit_diff": max_abs,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": agree / n,
        "positions": n,
    }


@torch.no_grad()
def reference_logits(
    base: Path,
    trained: Path,
    gates: dict[int, torch.Tensor],
    ids: list[torch.Tensor],
    dtype: torch.dtype,
    attach: AttachGates,
    place: Placement = Placement(torch.device("cpu"), 0, 0),
) -> dict[str, list[torch.Tensor]]:
    """Logits of the model as trained (float32), of its un-rotated twin and, for a low-precision bake, of its
    dtype-rounded twin."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **place.load_kwargs())
    model: Any = PeftModel.from_pretrained(causal, trained, is_trainable=False)
    model = (model if place.split else model.to(place.device)).eval()  # a split model stays where accelerate put it
    modules = attach(model, {i: A.clone() for i, A in gates.items()}, sorted(gates), 0.0)
    if sorted(modules) != sorted(gates):
        raise RuntimeError(f"attach_gates gated layers {sorted(modules)}, expected {sorted(gates)}")
    out = {"gated": forward_logits(model, ids)}
    saved = {i: g.A.detach().clone() for i, g in modules.items()}
    for g in modules.values():
        g.A.zero_()  # matrix_exp(0) = I: the LoRA-merged model without the rotation
    out["unrotated"] = forward_logits(model, ids)
    for i, g in modules.items():
        g.A.copy_(saved[i])
    if dtype != torch.float32:
        round_like_bake(model, set(gates), dtype, exact={id(g.A) for g in modules.values()})
        out["dtype_noise"] = forward_logits(model, ids)
    del model, modules
    _free(place.device)
    return out


_REWRITTEN = re.compile(r"\.layers\.(\d+)\.self_attn\.o_proj\.(?:base_layer\.)?weight$")
_OFF_GRID = 1.1  # not a power of two: x * 1.1 is off the low-precision grid even when x is on it


@torch.no_grad()
def round_like_bake(model, gated: set[int], dtype: torch.dtype, exact: set[int]) -> None:
    """Give the reference's base weights the rounding a correct bake gives them, independently of the fold:
    a tensor the bake copies is cast (exact when the base already is in `dtype`); a tensor the bake rewrites
    (LoRA-merged or rotated) gets a fresh rounding error of the same size, round(W·1.1)/1.1. The LoRA and
    gate parameters (ids in `exact`) stay exact."""
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in exact or not p.is_floating_point():
            continue
        m = _REWRITTEN.search(name)
        if ".base_layer." in name or (m and int(m.group(1)) in gated):
            p.copy_((p * _OFF_GRID).to(dtype).float() / _OFF_GRID)
        else:
            p.copy_(p.to(dtype).float())


@torch.no_grad()
def baked_logits(
    out_dir: Path, ids: list[torch.Tensor], place: Placement = Placement(torch.device("cpu"), 0, 0)
) -> list[torch.Tensor]:
    """Reload the saved directory exactly as any user would: stock class, no remote code, upcast to float32."""
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, output_loading_info=True, **place.load_kwargs()
    )
    model, info = loaded
    if type(model) is not Phi3ForCausalLM:
        raise RuntimeError(f"{out_dir}: reloaded as {type(model).__name__}, not transformers' Phi3ForCausalLM")
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"{out_dir}: the stock model does not match the saved tensors: {problems}")
    out = forward_logits(model.eval(), ids)
    del model
    _free(place.device)
    return out


def verify(
    out_dir: Path,
    base: Path,
    trained: Path,
    gates: dict[int, torch.Tensor],
    dtype: torch.dtype,
    opts: BakeOptions = BakeOptions(),
    attach: AttachGates | None = None,
    place: Placement | None = None,
) -> dict[str, Any]:
    """Compare the saved model with the model as trained; raises VerificationFailed (with the figures) when a
    bound is exceeded. `place`: plan_placement(base) unless given (the bake plans it before writing)."""
    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(out_dir))
    place = place or plan_placement(base)
    device = place.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with true_float32():
        ref = reference_logits(base, trained, gates, ids, dtype, attach or default_attach(), place)
        got = baked_logits(out_dir, ids, place)
    baked = compare(ref["gated"], got)
    noise = compare(ref["gated"], ref["dtype_noise"]) if "dtype_noise" in ref else None
    bounds = opts.bounds(noise)
    report: dict[str, Any] = {
        "device": place.describe(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "prompts": len(ids),
        "baked_vs_gated": baked,
        "unrotated_vs_gated": compare(ref["gated"], ref["unrotated"]),
        "dtype_noise_vs_gated": noise,
        "max_abs_reference_logit": max(float(x.abs().max()) for x in ref["gated"]),
        "bounds": bounds,
        "thresholds": {
            "max_abs_logit_diff": opts.max_logit_diff,
            "max_kl": opts.max_kl,
            "noise_margin": opts.noise_margin,
        },
    }
    over = [f"{k} {baked[k]:.3g} > {v:.3g}" for k, v in bounds.items() if not baked[k] <= v]  # NaN fails too
    report["passed"] = not over
    log.info(
        "verification on %s, %d prompts (%d positions): max|Δlogit| %.3g (unrotated %.3g%s), KL %.3g, top-1 %.4f",
        report["device"],
        len(ids),
        baked["positions"],
        baked["max_abs_logit_diff"],
        report["unrotated_vs_gated"]["max_abs_logit_diff"],
        f", {dtype_name(dtype)} rounding alone {noise['max_abs_logit_diff']:.3g}" if noise else "",
        baked["kl_mean"],
        baked["top1_agreement"],
    )
    if over:
        raise VerificationFailed(f"the baked model does not compute the trained function: {'; '.join(over)}", report)
    return report


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
