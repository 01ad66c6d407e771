"""The converter's options, declared once (CLI flags and the pipeline profile's `convert:` come from here).

Per-type bounds on the GGUF vs HF float32 logits: max |logit diff| <= max(max_abs, rel_max_abs x largest |HF
logit|), mean KL(HF || GGUF) per position <= kl, top-1 agreement on decisive positions >= top1_decisive. The
figures are about 2x the largest ratios measured on correct files (services/converter/compare.py has the table);
F16's mean |diff| stays ~1e-4 and its KL ~1e-7 throughout, and the KL bounds lie far above the tiny model's
(3e-8 / 2e-5 / 3e-2 at most) and far below a broken file's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from shared.config import StrictModel
from shared.layout import GGUF_TYPES, GgufType

DEFAULT_CTX = 512  # llama.cpp context of the checks; <= Phi-3's original context (see llama.py)


class Thresholds(StrictModel):
    max_abs: float = Field(gt=0, description="floor of the bound on max |logit diff| vs HF float32")
    rel_max_abs: float = Field(ge=0, description="the bound is max(floor, VALUE x largest |HF logit|)")
    kl: float = Field(gt=0, description="bound on the mean KL(HF || GGUF)")
    top1_decisive: float = Field(1.0, ge=0, le=1, description="least top-1 agreement on decisive positions")

    def max_abs_bound(self, reference_max: float) -> float:
        return max(self.max_abs, self.rel_max_abs * reference_max)


DEFAULT_THRESHOLDS: dict[GgufType, Thresholds] = {
    "F16": Thresholds(max_abs=5e-3, rel_max_abs=5e-3, kl=1e-3, top1_decisive=1.0),
    "Q8_0": Thresholds(max_abs=0.1, rel_max_abs=0.05, kl=1e-2, top1_decisive=1.0),
    "Q4_K_M": Thresholds(max_abs=0.6, rel_max_abs=0.4, kl=0.1, top1_decisive=0.95),
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
        json_schema_extra={"flags": {"kl": "max-kl"}, "key": "TYPE"},
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
