"""GGUF F16 -> Q8_0 / Q4_K_M with llama.cpp's quantiser (llama_model_quantize from the pinned bindings;
the same code as the `llama-quantize` tool, whose Q4_K_M output it matches byte for byte)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from services.converter.hf_to_gguf import ConvertError
from shared import logs
from shared.layout import GGUF_FILE_TYPES

log = logs.get("convert")
# the types made by quantising the F16 (llama_cpp.LLAMA_FTYPE_<llama.cpp's file-type name>)
FTYPES = {t: f"LLAMA_FTYPE_{GGUF_FILE_TYPES[t]}" for t in ("Q8_0", "Q4_K_M")}


@contextlib.contextmanager
def llama_log_to(logger: logging.Logger) -> Iterator[list[str]]:
    """Route llama.cpp's log into `logger` (its INFO as DEBUG: per-tensor lines) and collect warnings and errors.

    llama-cpp-python 0.3.36's own callback maps ggml's levels off by one (ggml: 1 debug, 2 info, 3 warn, 4 error),
    so with it INFO shows as a warning and errors can vanish; ours reads them right. Its callback is put back after.
    """
    import ctypes

    import llama_cpp
    import llama_cpp._logger as theirs

    problems: list[str] = []
    last = [logging.DEBUG]
    levels = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        lvl = last[0] if level == 5 else levels.get(level, logging.DEBUG)
        last[0] = lvl
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            logger.log(lvl, "llama.cpp: %s", line)
            if lvl >= logging.WARNING:
                problems.append(line)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield problems
    finally:
        llama_cpp.llama_log_set(theirs.llama_log_callback, ctypes.c_void_p(0))


def quantize(src: Path, dst: Path, qtype: str, threads: int | None = None) -> float:
    """Quantise the F16 GGUF `src` to `qtype` at `dst`; returns seconds. Raises ConvertError on failure."""
    import llama_cpp

    if qtype not in FTYPES:
        raise ConvertError(f"cannot quantise to {qtype!r}; expected one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = threads or os.cpu_count() or 1
    log.info("llama.cpp quantise %s -> %s (%s)", src.name, dst.name, qtype)
    t0 = time.time()
    with llama_log_to(log) as problems:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ConvertError(f"llama_model_quantize({src} -> {qtype}) returned {rc}: " + " | ".join(problems[-5:]))
    if not dst.is_file() or dst.stat().st_size == 0:
        raise ConvertError(f"llama_model_quantize({src} -> {qtype}) returned 0 but wrote no {dst}")
    return time.time() - t0
