"""Pipeline profile (configs/pipeline/<profile>.yaml): which data, which base, where the run goes.

Each stage's section is that stage's own option model (plus where its input comes from), so an option is
declared once, in the stage, and the profile sets it under the same name as the stage's CLI flag.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.baker.options import BakeOptions
from services.converter.options import ConvertOptions
from services.dataset.options import DatasetOptions
from services.eval.acceptance import AcceptancePolicy
from services.eval.options import EvalOptions
from services.tiny_model.options import TinyOptions
from services.trainer.config import BaseModelId
from services.trainer.options import TrainOptions
from shared.config import StrictModel
from shared.layout import GgufType

NAME = r"^[A-Za-z0-9._-]+$"


class DatasetStage(DatasetOptions):
    id: str = Field("example", pattern=NAME, description="the dataset's directory name under <data>/datasets/")
    inputs: list[str] | None = Field(
        None, min_length=1, description="input globs (default: <data>/input/four_class/*.jsonl)"
    )


class TrainStage(TrainOptions):
    config: str = Field("configs/train/tiny.yaml", description="training profile")
    base_model: BaseModelId = Field(
        "tiny",
        description="hub id, local directory, or 'tiny' for the tiny random "
        "Phi-3 (built once under <data>/models/tiny)",
    )


class ConvertStage(ConvertOptions):
    name: str = Field("so8t", pattern=NAME, description="GGUF file name stem: <name>-<TYPE>.gguf")


Split = Literal["val", "train", "probe"]
EvalModel = Literal["base", "baked", "F16", "Q8_0", "Q4_K_M"]
SPLITS: tuple[Split, ...] = ("val", "train", "probe")
EVAL_MODELS: tuple[EvalModel, ...] = ("base", "F16", "Q8_0", "Q4_K_M")


class EvalStage(EvalOptions):
    splits: list[Split] = Field(
        default_factory=lambda: list(SPLITS),
        min_length=1,
        description="the dataset's splits to ask, and the borderline probe set (built from `probe`)",
    )
    probe: list[str] = Field(
        default_factory=lambda: ["examples/probe/*.jsonl"],
        min_length=1,
        description="the probe split's four-class input globs, built like the dataset into <data>/datasets/<id>-probe",
    )
    acceptance: AcceptancePolicy = Field(
        AcceptancePolicy(),
        description="the limits a model must meet to be imported into Ollama and served (`acceptance: warn`: "
        "report only)",
    )
    models: list[EvalModel] = Field(
        default_factory=lambda: list(EVAL_MODELS),
        min_length=1,
        description="the base model, the baked model, and the GGUFs of convert.types",
    )


class OllamaStage(StrictModel):
    enabled: Literal["auto", "always", "never"] = Field(
        "auto", description="natively: import only when a server answers at OLLAMA_HOST (auto), always, never"
    )
    model: str = Field("so8t-think", pattern=r"^[a-z0-9._/-]+$", description="Ollama model name (<name>:<type>)")


class ServeStage(StrictModel):
    gguf_type: GgufType = Field("Q4_K_M", description="the quantisation the think API serves and the smoke tests ask")


class SmokeStage(StrictModel):
    prompt: str = "2+2はいくつですか？"
    max_tokens: int = Field(256, gt=0, le=4096)


class PipelineConfig(StrictModel):
    run_id: str = Field(pattern=NAME, description="the run's directory under <data>/runs/")
    dataset: DatasetStage = DatasetStage()
    train: TrainStage = TrainStage()
    tiny: TinyOptions = Field(TinyOptions(), description="the tiny base of train.base_model 'tiny'")
    bake: BakeOptions = BakeOptions()
    convert: ConvertStage = ConvertStage()
    eval: EvalStage = EvalStage()
    ollama: OllamaStage = OllamaStage()
    serve: ServeStage = ServeStage()
    smoke: SmokeStage = SmokeStage()
