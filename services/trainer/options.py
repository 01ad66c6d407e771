"""`so8t train`'s options besides its paths: the profile values a run may override, and how to run it. The pipeline
profile's train section is this model too (services/pipeline/config.py), so its command comes from here."""

from __future__ import annotations

from pydantic import Field

from services.trainer.config import BaseModelId, MaxSteps, Seed
from shared.config import StrictModel

# TrainOptions field -> the profile's dotted key it overrides
OVERRIDES = {"base_model": "model.base_model", "max_steps": "train.max_steps", "seed": "train.seed"}


class TrainOptions(StrictModel):
    base_model: BaseModelId | None = Field(
        None, description="hub id or local directory of the base model (overrides the profile's model.base_model)"
    )
    max_steps: MaxSteps | None = Field(None, description="optimizer steps (overrides epochs and train.max_steps)")
    seed: Seed | None = Field(
        None, description="seed of the data order, LoRA and gate initialisation (overrides train.seed)"
    )
    allow_cpu: bool = Field(
        False,
        description="train a CUDA profile (8/4-bit base, bf16/fp16) on the CPU when no CUDA device is usable, in fp32 "
        "(slow: for tests and rehearsals); without it such a run exits 2 with the reason",
    )

    def config_overrides(self) -> dict[str, object]:
        """{dotted profile key: value} for the options given."""
        return {key: getattr(self, name) for name, key in OVERRIDES.items() if getattr(self, name) is not None}
