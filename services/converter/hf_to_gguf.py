"""HF directory -> GGUF F16 with llama.cpp's own convert_hf_to_gguf.py, run as a subprocess.

The script and its gguf-py come from the pinned llama-cpp-python sdist (scripts/install-llama-cpp.sh copies them to
<sys.prefix>/share/so8t/llama.cpp); the vendored gguf-py goes first on PYTHONPATH because the script needs that
exact version (PyPI's `gguf` lacks what it imports).
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from shared import logs
from shared.errors import StageError
from shared.stage import die_with_parent

log = logs.get("convert")
INSTALL_HINT = "install it with scripts/install-llama-cpp.sh (make venv does)"
# llama.cpp gives Phi-3's special tokens the rstrip attribute (as HF's tokenizer has them) only when general.name
# contains one of these (src/llama-vocab.cpp); without it every "\n" after <|user|> etc. becomes extra tokens.
PHI3_NAME_MARKERS = ("phi-3", "phi3")


class ConvertError(StageError, RuntimeError):
    """The input is not convertible or llama.cpp's converter failed; the message says which and why."""

    exit_code = 2


def llama_cpp_dir() -> Path:
    """Where the vendored converter lives: $SO8T_LLAMA_CPP_DIR, else <sys.prefix>/share/so8t/llama.cpp."""
    return Path(os.environ.get("SO8T_LLAMA_CPP_DIR") or Path(sys.prefix) / "share" / "so8t" / "llama.cpp")


def converter_script() -> Path:
    script = llama_cpp_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConvertError(f"{script}: llama.cpp's converter not found; {INSTALL_HINT}")
    return script


def llama_cpp_version() -> str:
    """The pinned llama-cpp-python version the converter was copied from (its VERSION file)."""
    try:
        return (llama_cpp_dir() / "VERSION").read_text().strip()
    except FileNotFoundError:
        return "unknown"


def gguf_model_name(name: str) -> str:
    """`general.name` for the GGUF: `name`, marked as Phi-3 when it does not say so (see PHI3_NAME_MARKERS)."""
    return name if any(m in name.lower() for m in PHI3_NAME_MARKERS) else f"{name} (Phi-3)"


def check_model_dir(model_dir: Path) -> dict:
    """Fail early, naming the file, on a directory llama.cpp cannot convert as Phi-3; returns config.json."""
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConvertError(f"{model_dir}: model directory not found")
    if not cfg_path.is_file():
        hint = (
            " (a PEFT adapter: bake it first with `so8t bake`)" if (model_dir / "adapter_config.json").is_file() else ""
        )
        raise ConvertError(f"{cfg_path}: not found; expected a baked Hugging Face model directory{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConvertError(f"{cfg_path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if cfg.get("model_type") != "phi3":
        raise ConvertError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}; the converter expects 'phi3'")
    if not sorted(model_dir.glob("*.safetensors")):
        raise ConvertError(f"{model_dir}: no *.safetensors weights")
    for needed in ("tokenizer.model", "tokenizer_config.json"):
        if not (model_dir / needed).is_file():
            raise ConvertError(f"{model_dir / needed}: not found; llama.cpp's Phi-3 vocabulary needs it")
    return cfg


def parameter_count(model_dir: Path) -> int:
    """Values in the model's *.safetensors, from their headers alone (8-byte length, then JSON)."""
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in head.items() if k != "__metadata__")
    return total


def convert_f16(model_dir: Path, outfile: Path, name: str) -> float:
    """Run convert_hf_to_gguf.py to F16 at `outfile`; returns seconds. Raises ConvertError with the log's tail."""
    script = converter_script()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (str(script.parent / "gguf-py"), os.environ.get("PYTHONPATH")) if p),
    )
    argv = [
        sys.executable,
        str(script),
        str(model_dir),
        "--outtype",
        "f16",
        "--outfile",
        str(outfile),
        "--model-name",
        gguf_model_name(name),
    ]
    log.info("llama.cpp convert_hf_to_gguf.py %s -> %s (F16)", model_dir, outfile.name)
    t0 = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    # dies with this process: a killed stage leaves no converter writing into its staging directory
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
        **die_with_parent(),
    )
    for line in proc.stdout:  # type: ignore[union-attr]
        line = line.rstrip()
        tail.append(line)
        log.debug("%s", line)
    code = proc.wait()
    if code != 0:
        raise ConvertError(f"convert_hf_to_gguf.py exited with code {code} on {model_dir}:\n  " + "\n  ".join(tail))
    if not outfile.is_file() or outfile.stat().st_size == 0:
        raise ConvertError(f"convert_hf_to_gguf.py exited 0 but wrote no {outfile}")
    return time.time() - t0
