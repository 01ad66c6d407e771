"""Pipeline profile (configs/pipeline/<profile>.yaml): which data, which base, where the run goes."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.config import StrictModel
from shared.layout import GGUF_TYPES, GgufType
from shared.think_format import Format


class DatasetStage(StrictModel):
    id: str = "example"
    inputs: list[str] = Field(default_factory=lambda: ["examples/four_class/*.jsonl"], min_length=1)
    format: Format = "simple"
    val_ratio: float = Field(0.05, ge=0, lt=1)
    seed: int = 42


class TrainStage(StrictModel):
    config: str = "configs/train/tiny.yaml"
    # a hub id, a local directory, or "tiny" for the tiny random Phi-3 (built once under <data>/models/tiny)
    base_model: str = "tiny"
    max_steps: int | None = Field(None, gt=0)
    seed: int | None = None


class BakeStage(StrictModel):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ConvertStage(StrictModel):
    name: str = Field("so8t", pattern=r"^[A-Za-z0-9._-]+$")
    types: list[GgufType] = Field(default_factory=lambda: list(GGUF_TYPES), min_length=1)


class OllamaStage(StrictModel):
    enabled: Literal["auto", "always", "never"] = "auto"  # auto: only when a server answers at OLLAMA_HOST
    model: str = Field("so8t-think", pattern=r"^[a-z0-9._/-]+$")
    smoke_type: GgufType = "Q4_K_M"


class SmokeStage(StrictModel):
    gguf_type: GgufType = "Q4_K_M"
    prompt: str = "2+2はいくつですか？"
    max_tokens: int = Field(256, gt=0, le=4096)


class PipelineConfig(StrictModel):
    run_id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    dataset: DatasetStage = DatasetStage()
    train: TrainStage = TrainStage()
    bake: BakeStage = BakeStage()
    convert: ConvertStage = ConvertStage()
    ollama: OllamaStage = OllamaStage()
    smoke: SmokeStage = SmokeStage()
