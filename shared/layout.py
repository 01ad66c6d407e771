"""Where every artifact lives on the data volume (DESIGN.md "Data volume").

    <data>/input/four_class/*.jsonl
    <data>/datasets/<dataset_id>/{train,val,rejects}.jsonl, manifest.json
    <data>/runs/<run_id>/train/{checkpoints/checkpoint-<step>, final}/
    <data>/runs/<run_id>/baked/
    <data>/runs/<run_id>/gguf/<name>-{F16,Q8_0,Q4_K_M}.gguf
    <data>/runs/<run_id>/ollama/{Modelfile,smoke.json}
    <data>/hf_cache/   <data>/audit/
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

GgufType = Literal["F16", "Q8_0", "Q4_K_M"]
GGUF_TYPES: tuple[GgufType, ...] = get_args(GgufType)  # in conversion order: F16 first, quantised from it
# llama.cpp's `general.file_type` code of each (gguf.LlamaFileType: MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_K_M)
GGUF_FILE_TYPES: dict[GgufType, int] = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}
TRAINING_SESSION = "training_session.json"  # the trainer's live step/total, read by the pipeline for progress


def data_dir() -> Path:
    """The data volume: $DATA_DIR (``/data`` in the containers), else ./data."""
    return Path(os.environ.get("DATA_DIR", "data")).expanduser()


def gguf_name(name: str, qtype: str) -> str:
    """The one spelling of a GGUF file name, used by the converter and every later stage."""
    if qtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; expected one of {', '.join(GGUF_TYPES)}")
    return f"{name}-{qtype}.gguf"


def ollama_tag(qtype: str) -> str:
    return qtype.lower()


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def from_env(cls) -> "Layout":
        return cls(data_dir())

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    def dataset(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def run(self, run_id: str) -> "RunLayout":
        return RunLayout(self.root / "runs" / run_id)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def training_session(self) -> Path:
        return self.train / TRAINING_SESSION

    @property
    def final(self) -> Path:
        return self.train / "final"

    @property
    def baked(self) -> Path:
        return self.root / "baked"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    def gguf_file(self, name: str, qtype: str) -> Path:
        return self.gguf / gguf_name(name, qtype)

    @property
    def ollama(self) -> Path:
        return self.root / "ollama"
