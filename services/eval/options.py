"""The eval stage's options, declared once (CLI flags and the pipeline profile's `eval:` come from here)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.config import StrictModel


class EvalOptions(StrictModel):
    max_tokens: int = Field(256, ge=8, le=4096, description="longest reply, in tokens (greedy decoding)")
    max_records: dict[str, int] = Field(
        default_factory=dict,
        description="records per split at most, a seeded sample (e.g. train=24); a split left out is used whole",
        json_schema_extra={"key": "SPLIT"},
    )
    seed: int = Field(0, description="seed of the samples and of the generation")
    n_ctx: int = Field(2048, ge=256, le=4096, description="llama.cpp context (prompt + reply)")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for llama.cpp and torch (default: all); changes no output"
    )
    label_scores: bool = Field(
        True, description="score each label's probability at the verdict (four teacher-forced passes per record)"
    )
    hf_without_cuda: Literal["gguf", "transformers"] = Field(
        "gguf",
        description="where no CUDA device is: evaluate a Hugging Face model as an F16 GGUF converted once and cached "
        "($HF_HOME/so8t-gguf or ~/.cache/so8t/gguf) through llama.cpp like the trained files (minutes for 3.8 B), or "
        "through transformers in float32 (15 GB of RAM and hours for 3.8 B)",
    )
