"""The trained artifact `<output-dir>/final/`: the trainer -> baker contract, its file names and its manifest.

    adapter_config.json, adapter_model.safetensors   PEFT LoRA adapter (base_model_name_or_path = base as given)
    so8t_gates.safetensors                           {layer: A [k, 8, 8] float32} via shared.so8.save_gates
    manifest.json                                    stage "train", written last (shared.stage)

The same adapter and gate files are in every checkpoint. Kept free of torch imports: the baker reads the names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared import atomic

STAGE = "train"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GATES = "so8t_gates.safetensors"
OUTPUTS = {"adapter": ADAPTER_WEIGHTS, "adapter_config": ADAPTER_CONFIG, "gates": GATES}


def save_adapter(peft_model, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT's save, without its generated model card).

    PEFT writes target_modules from a set, in the process's string-hash order: sorted here, so the same training
    gives the same bytes in every process."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)
    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic.write_json(config_path, config)


def save_gate_file(directory: Path, gates: dict, hidden_size: int) -> None:
    from shared.so8 import save_gates

    save_gates(directory / GATES, gates, hidden_size)


def describe(base: str, base_sha: str | None, cfg, gate_layers: list[int], hidden_size: int) -> dict[str, Any]:
    """The contract's extra top-level manifest keys (the baker reads base_model and base_model_sha256)."""
    return {
        "base_model": base,
        "base_model_sha256": base_sha,
        "lora": {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "target_modules": list(cfg.lora.target_modules),
        },
        "gates": {"layer_indices": gate_layers, "init_scale": cfg.gates.init_scale, "hidden_size": hidden_size},
        "quantization": cfg.model.quantization,
    }
