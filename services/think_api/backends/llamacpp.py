"""A GGUF run in-process by llama.cpp (llama-cpp-python), whole or streamed token by token."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.think_api.backends.protocol import BackendError, Generation, GenRequest, StreamItem
from shared.think_format import STOP_TOKENS


def _counting_llama(**kwargs: Any):
    """A llama_cpp.Llama that counts the tokens of its last generation: a streamed completion reports no usage,
    and these counts are the ones the whole completion reports (the end-of-generation token not included)."""
    import llama_cpp

    class CountingLlama(llama_cpp.Llama):
        prompt_count = sampled = 0
        ended_on_eog = False

        def generate(self, tokens, *args, **kw):  # create_completion's token loop; it never send()s into it
            self.prompt_count, self.sampled, self.ended_on_eog = len(tokens), 0, False
            for token in super().generate(tokens, *args, **kw):
                self.sampled += 1
                self.ended_on_eog = bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))
                yield token

        def completion_count(self) -> int:
            return self.sampled - int(self.ended_on_eog)

    return CountingLlama(**kwargs)


class LlamaCppBackend:
    """One generation at a time: a Llama is not thread-safe, so a stream holds the lock until it is closed."""

    name = "llamacpp"
    parallel = 1  # admission's default: one generation at a time

    def __init__(self, gguf: str | Path, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0):
        path = Path(gguf)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        self.model = path.name
        self._lock = threading.Lock()
        self._llm = _counting_llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), seed=seed, verbose=False
        )

    def _completion(self, req: GenRequest, stream: bool):
        return self._llm.create_completion(
            req.prompt,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=list(STOP_TOKENS),
            stream=stream,
        )

    @contextlib.contextmanager
    def _context_errors(self) -> Iterator[None]:
        try:
            yield
        except ValueError as err:
            if "context window" in str(err):
                raise BackendError(
                    "prompt_too_long",
                    400,
                    f"the prompt does not fit the model's context window ({self._llm.n_ctx()} tokens)",
                ) from None
            raise

    def generate(self, req: GenRequest) -> Generation:
        with self._lock, self._context_errors():
            out = self._completion(req, stream=False)
        choice, usage = out["choices"][0], out.get("usage", {})
        return Generation(
            choice["text"], usage.get("prompt_tokens"), usage.get("completion_tokens"), choice.get("finish_reason")
        )

    def stream(self, req: GenRequest) -> Iterator[StreamItem]:
        with self._lock:
            parts: list[str] = []
            finish = None
            chunks = self._completion(req, stream=True)
            try:
                with self._context_errors():
                    for chunk in chunks:
                        choice = chunk["choices"][0]
                        finish = choice.get("finish_reason") or finish
                        if choice["text"]:
                            parts.append(choice["text"])
                            yield choice["text"]
            finally:
                chunks.close()  # here, under the lock: a stream closed early stops generating now
            yield Generation("".join(parts), self._llm.prompt_count, self._llm.completion_count(), finish)

    def health(self) -> tuple[bool, str]:
        return True, "model loaded"

    def close(self) -> None:
        with self._lock:
            self._llm.close()
