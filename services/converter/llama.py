"""Run a GGUF in llama.cpp (llama-cpp-python): tokenise, logits at every position, greedy generation.

Reusable by any stage that needs llama.cpp's view of a model (the converter's checks, tests, the think API).
Keep n_ctx at or below the model's original context (4096 for Phi-3.5): llama.cpp picks longrope's short factors
from n_ctx, HF from the sequence length, so only then do both run the same rotary embedding on short prompts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_CTX = 512


def open_model(
    gguf: str | Path, n_ctx: int = DEFAULT_CTX, threads: int | None = None, logits_all: bool = True
) -> Llama:
    """Load `gguf` on the CPU; with `logits_all` every evaluated position keeps its logits (llm.scores)."""
    from llama_cpp import Llama

    path = Path(gguf)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    threads = threads or os.cpu_count() or 1
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        seed=0,
        verbose=False,
    )


def tokenize(llm: Llama, text: str) -> list[int]:
    """llama.cpp's ids for `text`: template tokens parsed as special tokens, no BOS (as the Phi-3.5 template)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def detokenize(llm: Llama, ids: Iterable[int]) -> str:
    return llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")


def logits(llm: Llama, ids: Sequence[int]) -> np.ndarray:
    """float32 [len(ids), n_vocab]: the logits llama.cpp computes at each position of `ids` (from a fresh cache)."""
    if len(ids) > llm.n_ctx():
        raise ValueError(f"{len(ids)} tokens do not fit n_ctx={llm.n_ctx()}")
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def greedy(llm: Llama, prompt_ids: Sequence[int], max_new: int, stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy (argmax) continuation of `prompt_ids`, up to `max_new` tokens; a stop id ends it and is not kept."""
    stop = set(stop_ids)
    llm.reset()
    llm.eval(list(prompt_ids))
    out: list[int] = []
    for _ in range(max_new):
        if llm.n_tokens >= llm.n_ctx():
            break
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in stop:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out
