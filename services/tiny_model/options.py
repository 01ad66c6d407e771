"""The tiny model's options, declared once (CLI flags and the tiny profile's `tiny:` section come from here)."""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.config import StrictModel


class TinyOptions(StrictModel):
    seed: int = Field(0, description="weight initialisation and pretraining seed")
    hidden: int = Field(256, gt=0, description="hidden size, a multiple of 256 (K-quants work on 256-wide blocks)")
    layers: int = Field(2, gt=0, description="decoder layers")
    heads: int = Field(4, gt=0, description="attention heads")
    intermediate: int = Field(512, gt=0, description="MLP width")
    vocab: int = Field(1000, ge=300, le=8000, description="real SentencePiece pieces (padded to Phi-3's 32000)")
    pretrain_steps: int = Field(300, ge=0, description="with --pretrain-on: full-parameter optimizer steps")
    pretrain_lr: float = Field(3e-3, gt=0, description="with --pretrain-on: peak learning rate (AdamW, cosine)")
    pretrain_batch: int = Field(8, gt=0, description="with --pretrain-on: documents per step")

    @field_validator("hidden")
    @classmethod
    def _k_quants(cls, v: int) -> int:
        if v % 256:
            raise ValueError(f"{v} is not a multiple of 256 (K-quants work on 256-wide blocks)")
        return v

    def sizes(self) -> dict[str, int]:
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.heads, "intermediate": self.intermediate}
