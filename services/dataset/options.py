"""The dataset builder's options, declared once (CLI flags and the pipeline profile's `dataset:` come from here)."""

from __future__ import annotations

from pydantic import Field

from shared.config import StrictModel
from shared.think_format import Format


class DatasetOptions(StrictModel):
    format: Format = Field(
        "simple", description="assistant format: '# 思考ステップ / # 最終回答' (simple) or the four tags (quadruple)"
    )
    val_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="validation share per label")
    seed: int = Field(42, description="split seed")
    min_quality: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="drop records whose thinking scores below this (0-1); dropped lines go to rejects.jsonl",
    )
