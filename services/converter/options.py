"""The converter's options, declared once (CLI flags and the pipeline profile's `convert:` come from here).

Each GGUF is judged in two ways (services/converter/compare.py explains the figures):
- its weights: every tensor, dequantised by gguf-py, against the HF tensor: relative RMS error <= weight_rel_rms
  (what the type's rounding does to a tensor: ~3e-4 F16 from float32, ~5e-3 Q8_0, ~7e-2 Q4_K; a wrong, missing or
  garbled tensor is ~1 or more);
- its logits in llama.cpp against HF float32: each bound is the type's own figure for a model that rounding barely
  moves, plus `noise_margin` x what the file's own rounded weights cost the HF model itself (the baker's rule). So a
  deep model whose logits amplify rounding (a random-weight 32-layer one) is judged by its own sensitivity, and a
  robust trained model keeps the tight bounds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from shared.config import StrictModel
from shared.layout import GGUF_TYPES, GgufType

REFERENCE_LAYERS = 2  # the depth of the tiny Phi-3 the bounds were calibrated on
DEFAULT_CTX = 512  # llama.cpp context of the checks; <= Phi-3's original context (see llama.py)


class Thresholds(StrictModel):
    max_abs: float = Field(gt=0, description="floor of the bound on max |logit diff| vs HF float32")
    rel_max_abs: float = Field(
        ge=0, description="the floor is max(max_abs, VALUE x largest |HF logit| x sqrt(layers / 2))"
    )
    kl: float = Field(gt=0, description="bound on the mean KL(HF || GGUF)")
    top1_decisive: float = Field(1.0, ge=0, le=1, description="least top-1 agreement on decisive positions")
    weight_rel_rms: float = Field(
        1.0, gt=0, description="bound on each tensor's relative RMS error against the HF weights"
    )

    def max_abs_bound(self, reference_max: float, layers: int = REFERENCE_LAYERS) -> float:
        """Rounding in the forward adds up layer after layer like a random walk: the relative part grows as
        sqrt(layers), from the 2-layer tiny model it was measured on (max|diff| / largest |logit|: F16 2.3e-3 at
        2 layers, 5.8e-3 at 32 on a random-weight Phi-3.5-mini)."""
        return max(self.max_abs, self.rel_max_abs * reference_max * math.sqrt(max(layers, 1) / REFERENCE_LAYERS))

    def bounds(self, reference_max: float, layers: int, noise: dict[str, Any], margin: float) -> dict[str, float]:
        """The bounds of one file, given the metrics of the HF model with the file's own weights (`noise`)."""
        disagree = 1 - (noise["top1_decisive"] if noise.get("top1_decisive") is not None else 1.0)
        return {
            "max_abs": self.max_abs_bound(reference_max, layers) + margin * noise["max_abs"],
            "kl_mean": self.kl + margin * noise["kl_mean"],
            "top1_decisive": max(0.0, self.top1_decisive - margin * disagree),
        }


DEFAULT_THRESHOLDS: dict[GgufType, Thresholds] = {
    "F16": Thresholds(max_abs=5e-3, rel_max_abs=5e-3, kl=1e-3, top1_decisive=1.0, weight_rel_rms=1e-2),
    "Q8_0": Thresholds(max_abs=0.1, rel_max_abs=0.05, kl=1e-2, top1_decisive=1.0, weight_rel_rms=0.05),
    "Q4_K_M": Thresholds(max_abs=0.6, rel_max_abs=0.4, kl=0.1, top1_decisive=0.95, weight_rel_rms=0.25),
}


class ConvertOptions(StrictModel):
    types: list[GgufType] = Field(
        default_factory=lambda: list(GGUF_TYPES),
        min_length=1,
        description="GGUF types to write; quantisations are made from the F16",
    )
    thresholds: dict[GgufType, Thresholds] = Field(
        default_factory=lambda: dict(DEFAULT_THRESHOLDS),
        description="per-type bounds; a type or bound left out keeps its default",
        json_schema_extra={"flags": {"kl": "max-kl", "weight_rel_rms": "max-weight-error"}, "key": "TYPE"},
    )
    noise_margin: float = Field(
        4.0, ge=1, description="each logit bound widens by VALUE x what the file's own rounded weights cost HF"
    )
    n_ctx: int = Field(DEFAULT_CTX, ge=64, le=4096, description="llama.cpp context for the checks")
    smoke_tokens: int = Field(16, ge=1, le=256, description="tokens of the greedy generation each file must run")
    token_check: Literal["fail", "warn"] = Field(
        "warn", description="when llama.cpp tokenises the check conversation differently from HF: fail or warn"
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for llama.cpp and torch (default: all); changes no output"
    )

    @field_validator("types")
    @classmethod
    def _ordered_unique(cls, v: list[str]) -> list[str]:
        return [t for t in GGUF_TYPES if t in v]

    @field_validator("thresholds", mode="before")
    @classmethod
    def _over_defaults(cls, v: Any) -> Any:
        """Partial bounds (a YAML section, --max-abs Q8_0=0.2) complete each type's defaults."""
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {t: d.model_dump() for t, d in DEFAULT_THRESHOLDS.items()}
        for qtype, given in v.items():
            given = given.model_dump() if isinstance(given, Thresholds) else given
            out[qtype] = {**out.get(qtype, {}), **given} if isinstance(given, dict) else given
        return out

    def threshold(self, qtype: str) -> Thresholds:
        return self.thresholds[qtype]  # type: ignore[index]
