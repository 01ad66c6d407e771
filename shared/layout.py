"""Where every artifact lives on the data volume (docs/design.md "Data volume").

<data>/input/four_class/*.jsonl
<data>/datasets/<dataset_id>/{train,val,rejects}.jsonl, manifest.json
<data>/models/tiny/                      the tiny random Phi-3 (tiny profile)
<data>/runs/<run_id>/train/{checkpoints/checkpoint-<step>, final}/
<data>/runs/<run_id>/baked/
<data>/runs/<run_id>/gguf/<name>-{F16,Q8_0,Q4_K_M}.gguf
<data>/runs/<run_id>/ollama/{Modelfile,smoke.json}
<data>/runs/<run_id>/{stack/, logs/, status.json}
<data>/hf_cache/   <data>/audit/
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

GgufType = Literal["F16", "Q8_0", "Q4_K_M"]
GGUF_TYPES: tuple[GgufType, ...] = get_args(GgufType)  # in conversion order: F16 first, quantised from it
# llama.cpp's name of each file type: gguf.LlamaFileType[...] (the header's general.file_type), LLAMA_FTYPE_...
GGUF_FILE_TYPES: dict[GgufType, str] = {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_K_M": "MOSTLY_Q4_K_M"}
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
    def from_env(cls) -> Layout:
        return cls(data_dir())

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def input_glob(self) -> Path:
        """What the user brings: the four-class JSONL files (a profile's dataset.inputs may name others)."""
        return self.root / "input" / "four_class" / "*.jsonl"

    @property
    def tiny_model(self) -> Path:
        return self.root / "models" / "tiny"

    def dataset(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def run(self, run_id: str) -> RunLayout:
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

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def stack(self) -> Path:
        """The compose stack's finish markers (services.stack)."""
        return self.root / "stack"

    @property
    def logs(self) -> Path:
        """The native orchestrator's per-stage logs."""
        return self.root / "logs"

    @property
    def status(self) -> Path:
        return self.root / "status.json"


def main(argv: list[str] | None = None) -> int:
    """`python3 -m shared.layout --data-dir D [--run-id R] WHAT`: print a path (for the Makefile; stdlib only)."""
    import argparse

    p = argparse.ArgumentParser(prog="python3 -m shared.layout", description=main.__doc__)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--run-id", default="")
    p.add_argument("what", choices=("input", "run", "stack"))
    args = p.parse_args(argv)
    layout = Layout(Path(args.data_dir)) if args.data_dir else Layout.from_env()
    path = {
        "input": lambda: layout.input_glob.parent,
        "run": lambda: layout.run(args.run_id).root,
        "stack": lambda: layout.run(args.run_id).stack,
    }[args.what]()
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
