"""Training profile (configs/train/<profile>.yaml), validated at load: unknown keys and bad values name the key."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from shared import phi3
from shared.config import StrictModel

DEFAULT_BASE = "AXCXEPT/Borea-Phi-3.5-mini-Instruct-Jp"
# options the pipeline profile and the CLI set as well: declared once here
BaseModelId = Annotated[str, Field(min_length=1, description="hub id or local directory of the base model")]
MaxSteps = Annotated[int, Field(gt=0, description="optimizer steps (overrides epochs)")]
Seed = Annotated[int, Field(description="seed of the data order, LoRA and gate initialisation")]


class ModelSection(StrictModel):
    base_model: BaseModelId | None = DEFAULT_BASE
    # the prototype's default is 8-bit; "none" keeps the base in `precision` (CPU tests)
    quantization: Literal["8bit", "4bit", "none"] = "8bit"
    # compute dtype: autocast (and the 4-bit compute dtype) on CUDA; the CPU always trains in fp32
    precision: Literal["fp32", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = True
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"


class LoraSection(StrictModel):
    r: int = Field(64, gt=0)
    alpha: float = Field(128, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(phi3.LORA_TARGETS), min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in phi3.LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"unknown LoRA target module(s) {unknown}: Phi-3's linear layers are "
                f"{', '.join(phi3.LORA_TARGETS)} (it has no q/k/v/gate/up projections of its own)"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate LoRA target modules in {names}")
        return names


class GatesSection(StrictModel):
    enabled: bool = True
    layer_indices: list[int] | None = None  # null = every layer
    init_scale: float = Field(0.05, ge=0)
    orthogonal_reg: float = Field(1e-4, ge=0)

    @field_validator("layer_indices")
    @classmethod
    def _indices(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if any(i < 0 for i in v):
                raise ValueError("layer indices must be >= 0")
            if len(set(v)) != len(v):
                raise ValueError(f"duplicate layer indices in {v}")
            v = sorted(v)
        return v


class PetPhase(StrictModel):
    name: str
    fraction: float = Field(gt=0, le=1)
    weight: float = Field(ge=0)


class PetSection(StrictModel):
    enabled: bool = True
    huber_delta: float = Field(0.0, ge=0)
    phases: list[PetPhase] = Field(
        default_factory=lambda: [
            PetPhase(name="exploration", fraction=0.2, weight=0.01),
            PetPhase(name="transition", fraction=0.4, weight=0.05),
            PetPhase(name="stabilisation", fraction=0.4, weight=0.1),
        ],
        min_length=1,
    )

    @field_validator("phases")
    @classmethod
    def _sum(cls, phases: list[PetPhase]) -> list[PetPhase]:
        from fractions import Fraction

        if sum(Fraction(str(p.fraction)) for p in phases) != 1:
            raise ValueError(f"phase fractions must sum to 1, got {[p.fraction for p in phases]}")
        return phases


class OptimSection(StrictModel):
    # paged_adamw_8bit (bitsandbytes) needs CUDA; on the CPU the trainer falls back to torch.optim.AdamW
    optimizer: Literal["paged_adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)


class TrainSection(StrictModel):
    epochs: float = Field(3, gt=0)
    max_steps: MaxSteps | None = None
    seq_len: int = Field(2048, ge=8)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(16, gt=0)
    packing: bool = Field(
        False,
        description="pack the batch_size × grad_accum records of each optimizer step (per process) first-fit into "
        "rows of at most seq_len tokens, one row per forward, attention block-diagonal per record: no padding and "
        "fewer, fuller forwards; the same records, losses and normalisation per step as without packing",
    )
    seed: Seed = 42
    # train on a seeded random subset of this many records (the fast profile's optional sampling)
    sample: int | None = Field(None, gt=0)
    # bitwise reproducible (torch deterministic algorithms; CPU: MKL strict mode, fixed thread count)
    deterministic: bool = False
    num_threads: int | None = Field(None, gt=0)  # torch intra-op threads on the CPU (None: torch's default)
    # validation: mean LM loss on the assistant tokens of val.jsonl every eval_steps steps and at the end (null:
    # none), on its first eval_max_records records (a seeded sample; null: all). It changes no weight.
    eval_steps: int | None = Field(None, gt=0)
    eval_max_records: int | None = Field(None, gt=0)
    # at each validation, a greedy reply to the first eval_generate_records of those records (0: none): the share in
    # the /think format and with the reference's verdict, to the console, TensorBoard and the final manifest
    eval_generate_records: int = Field(8, ge=0)
    eval_generate_tokens: int = Field(256, gt=0)


class CheckpointSection(StrictModel):
    save_steps: int | None = Field(500, gt=0)
    save_minutes: float | None = Field(30, gt=0)  # also save when this much time has passed since the last save
    keep: int = Field(5, gt=0)


class LoggingSection(StrictModel):
    log_steps: int = Field(10, gt=0)
    tensorboard: bool = True


class TrainConfig(StrictModel):
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    gates: GatesSection = GatesSection()
    pet: PetSection = PetSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _some_save(self) -> TrainConfig:
        if self.checkpoint.save_steps is None and self.checkpoint.save_minutes is None:
            raise ValueError("checkpoint: set save_steps, save_minutes or both (power-loss recovery needs one)")
        return self

    def training_digest(self) -> str:
        """Hash of everything that changes the trained weights (not how often to save or log).

        Checkpoints from a run with another digest are not resumed; a final artifact with the same digest and
        dataset is up to date.
        """
        return self.digest(
            exclude={
                "checkpoint": True,
                "logging": True,
                "train": {
                    "num_threads",
                    "eval_steps",
                    "eval_max_records",
                    "eval_generate_records",
                    "eval_generate_tokens",
                },
            }
        )
