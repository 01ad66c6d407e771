"""GGUF F16 -> Q8_0 / Q4_K_M with llama.cpp's quantiser (llama_model_quantize from the pinned bindings;
the same code as the `llama-quantize` tool, whose Q4_K_M output it matches byte for byte)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from services.converter.hf_to_gguf import ConvertError
from shared import logs

log = logs.get("convert")
# our type name -> llama_ftype name in llama_cpp
FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@contextlib.contextmanager
def quiet_llama(level: int = logging.WARNING) -> Iterator[None]:
    """Keep llama.cpp's per-tensor INFO lines off the console (llama_cpp routes them through this logger)."""
    import llama_cpp._logger as llog

    before = llog.logger.level
    llog.logger.setLevel(level)
    try:
        yield
    finally:
        llog.logger.setLevel(before)


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
    with quiet_llama():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ConvertError(f"llama_model_quantize({src} -> {qtype}) returned {rc} (llama.cpp's error is above)")
    if not dst.is_file() or dst.stat().st_size == 0:
        raise ConvertError(f"llama_model_quantize({src} -> {qtype}) returned 0 but wrote no {dst}")
    return time.time() - t0
