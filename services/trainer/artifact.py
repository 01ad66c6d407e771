"""The trained artifact `<output-dir>/final/` (the trainer/baker contract) and its manifest.

    adapter_config.json, adapter_model.safetensors   PEFT LoRA adapter (base_model_name_or_path = base as given)
    so8t_gates.safetensors                           {layer: A [k, 8, 8] float32} via shared.so8.save_gates
    manifest.json                                    stage "train", written last
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shared import manifest
from shared.so8 import GATES_FILE, save_gates

STAGE = "train"


def save_adapter(peft_model, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT's save, without its generated model card)."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)


def save_gate_file(directory: Path, gates: dict, hidden_size: int) -> None:
    save_gates(directory / GATES_FILE, gates, hidden_size)


def describe(base: str, base_sha: str | None, cfg, gate_layers: list[int], hidden_size: int) -> dict[str, Any]:
    """The contract's extra top-level manifest keys."""
    return {
        "base_model": base,
        "base_model_sha256": base_sha,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules)},
        "gates": {"layer_indices": gate_layers, "init_scale": cfg.gates.init_scale, "hidden_size": hidden_size},
        "quantization": cfg.model.quantization,
    }


def up_to_date(final: Path, inputs: dict, digest: str, base: str, base_sha: str | None) -> bool:
    """A final artifact from the same config, dataset and base model (by hash for a local base)."""
    if not manifest.is_up_to_date(final, STAGE, inputs, digest):
        return False
    m = manifest.read(final) or {}
    return m.get("base_model") == base and m.get("base_model_sha256") == base_sha
