"""Fixtures shared by every stage's tests: the tiny Phi-3 and, when present, the real Phi-3.5 tokenizer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pipeline_runs import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = Path(os.environ.get("SO8T_REAL_TOKENIZER", REPO.parent / "shared" / "fixtures" / "phi35-tokenizer"))

os.environ.setdefault("SO8T_PROGRESS", "0")
# The suite is the CPU's: on a GPU box the trainer would otherwise pick CUDA (and the gloo DDP test NCCL). Set before
# anything imports torch, and inherited by every subprocess the tests start; bench/gpu.sh is what runs on a GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Phi-3 (random weights, seed 0) with tokenizer; read-only for tests, copy before changing."""
    from shared.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if not (REAL_TOKENIZER / "tokenizer_config.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer not present at {REAL_TOKENIZER}")
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def tiny_gguf_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Phi-3 through the converter stage: tiny-F16.gguf, tiny-Q8_0.gguf, tiny-Q4_K_M.gguf + manifest.json,
    every file checked (read-only for tests). Skipped when llama.cpp is not installed (scripts/install-llama-cpp.sh)."""
    from services.converter import hf_to_gguf
    from services.converter.convert import convert

    try:
        hf_to_gguf.converter_script()
    except hf_to_gguf.ConvertError as err:
        pytest.skip(str(err))
    out = tmp_path_factory.mktemp("tiny_gguf")
    convert(tiny_model_dir, out, "tiny")
    return out


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny profile's whole chain, native, on a fresh data folder, run once a session: the end-to-end tests
    check it, the stack tests compare their containers' training with it (deterministic: bitwise the same)."""
    data = tmp_path_factory.mktemp("data")
    r = tiny_pipeline(data)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return data, r
