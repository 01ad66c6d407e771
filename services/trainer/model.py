"""Base model (hub id or local dir; 8-bit, 4-bit nf4 or unquantised), LoRA on Phi-3's real module names,
gradient checkpointing, and the optimizer.

Hub downloads go to $HF_HOME (huggingface_hub honours it; the containers set HF_HOME=/data/hf_cache).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from services.trainer.config import LoraSection, ModelSection, OptimSection
from shared import logs
from shared.errors import InputError

log = logs.get("trainer")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(InputError, ValueError):
    """The base model or the LoRA settings do not fit together."""


def compute_dtype(cfg: ModelSection, device: torch.device) -> torch.dtype:
    """fp32 on the CPU (half-precision matmuls there are slow and not what the GPU run does), else the config's;
    bf16 on a card without native bf16 (pre-Ampere: torch emulates it, several times slower) becomes fp16."""
    if device.type != "cuda":
        return torch.float32
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning(
            "precision bf16: %s has no native bf16 (emulated, slow); computing in fp16 with a grad scaler",
            torch.cuda.get_device_name(device),
        )
        return torch.float16
    return _DTYPES[cfg.precision]


def checkpointing_kwargs(cfg: ModelSection) -> dict[str, bool]:
    """Reentrant checkpointing for a k-bit base: bitsandbytes' MatMul8bitLt and MatMul4Bit keep their input on
    `ctx` (not save_for_backward), out of reach of the saved-tensor hooks non-reentrant checkpointing relies on,
    so with it every int8 layer's input stays alive until backward (+3-4 GB at seq 2048 on Phi-3.5-mini). The
    reentrant variant runs the forward under no_grad and builds the graph again in backward: nothing is kept."""
    return {"use_reentrant": cfg.quantization != "none"}


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of base model {base!r}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelSection, base: str, device: torch.device) -> nn.Module:
    """Load the causal LM on `device`, quantised per config."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cfg, device)
    quant = None
    if cfg.quantization == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    elif cfg.quantization == "4bit":
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=dtype,
            quantization_config=quant,
            device_map=device_map,
            attn_implementation=cfg.attn_implementation,
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load base model {base!r}: {err}") from None
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing_kwargs(cfg),
            )
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(checkpointing_kwargs(cfg))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def linear_names(model: nn.Module) -> set[str]:
    """Last name component of every linear layer inside the decoder layers (what LoRA can target)."""
    names = set()
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and hasattr(module, "in_features") and hasattr(module, "out_features"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def add_lora(model: nn.Module, cfg: LoraSection, base: str, seed: int) -> nn.Module:
    """Wrap `model` with LoRA; every target name must match linear layers of this model."""
    from peft import LoraConfig, get_peft_model

    present = linear_names(model)
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise ModelError(
            f"LoRA target module(s) {missing} not found in {base}; its decoder linear layers are {sorted(present)}"
        )
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (α/r)
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads transformers' deprecated checkpointing flag
        peft_model = get_peft_model(model, lcfg)
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def build_optimizer(cfg: OptimSection, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """paged_adamw_8bit (bitsandbytes) on CUDA as the prototype; on the CPU torch.optim.AdamW (same update
    rule, fp32 states): bitsandbytes' paged 8-bit optimizer needs CUDA memory paging."""
    if cfg.optimizer == "paged_adamw_8bit" and device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "paged_adamw_8bit":
        log.info("optimizer: paged_adamw_8bit needs CUDA; using torch.optim.AdamW on the CPU")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def build_scheduler(cfg: OptimSection, optimizer: torch.optim.Optimizer, total: int):
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(cfg.warmup_ratio * total)  # as transformers' Trainer
    if cfg.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if cfg.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def is_local(base: str) -> bool:
    return Path(base).is_dir()
