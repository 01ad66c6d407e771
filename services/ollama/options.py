"""The Ollama commands' options, declared once: `so8t ollama import | smoke | modelfile` flags, defaults and help
come from here."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.config import StrictModel
from shared.think_format import Format

FORMAT_HELP = "the /think format the model was trained on"


class ServerOptions(StrictModel):
    """How to reach the Ollama server."""

    host: str | None = Field(None, description="Ollama server URL (default: $OLLAMA_HOST, else http://127.0.0.1:11434)")
    wait: float = Field(120.0, ge=0, description="seconds to wait for the server to come up")


class ImportOptions(ServerOptions):
    gguf: list[Path] = Field(min_length=1, description="GGUF file(s) written by `so8t convert`")
    model: str = Field(
        description="model name; the tag is the quantisation (name:f16, name:q8_0, name:q4_k_m) unless given "
        "as name:tag (one GGUF only)"
    )
    run_dir: Path | None = Field(
        None, description="where Modelfile.<tag> and manifest.json go (default: <gguf dir>/../ollama)"
    )
    format: Format = Field("simple", description=FORMAT_HELP)


class SmokeOptions(ServerOptions):
    model: str = Field(description="name:tag of an imported model")
    output: Path = Field(description="directory for smoke.json")
    timeout: float = Field(600.0, gt=0, description="seconds allowed per reply")


class ModelfileOptions(StrictModel):
    gguf: Path = Field(description="the GGUF file")
    output: Path | None = Field(
        None, description="Modelfile path; FROM is then relative to it (default: print to stdout, FROM absolute)"
    )
    format: Format = Field("simple", description=FORMAT_HELP)
