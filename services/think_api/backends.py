"""Where the /think API gets its model replies: an Ollama server, llama.cpp in-process, or (tests only) fixed output.

Every backend takes the prompt already rendered in the Phi-3.5 chat template (shared.think_format.render_chat)
and stops at the template's tokens, so all of them see exactly what the model was trained on.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from shared.think_format import STOP_TOKENS


@dataclass(frozen=True)
class GenRequest:
    prompt: str  # rendered chat text ending in `<|assistant|>\n`
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class BackendError(RuntimeError):
    """A generation that failed for a reason the client may see (code, HTTP status, message without model text)."""

    def __init__(self, code: str, http_status: int, message: str):
        super().__init__(message)
        self.code, self.http_status, self.message = code, http_status, message


class Backend(Protocol):
    name: str
    model: str

    def generate(self, req: GenRequest) -> Generation: ...

    def health(self) -> tuple[bool, str]: ...

    def close(self) -> None: ...


class LlamaCppBackend:
    """A GGUF run in-process by llama.cpp (llama-cpp-python). One generation at a time: a Llama is not thread-safe."""

    name = "llamacpp"

    def __init__(self, gguf: str | Path, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0):
        from llama_cpp import Llama

        path = Path(gguf)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        self.model = path.name
        self._lock = threading.Lock()
        self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), seed=seed,
                          verbose=False)

    def generate(self, req: GenRequest) -> Generation:
        with self._lock:
            try:
                out = self._llm.create_completion(req.prompt, max_tokens=req.max_tokens, temperature=req.temperature,
                                                  top_p=req.top_p, seed=req.seed, stop=list(STOP_TOKENS))
            except ValueError as err:
                if "context window" in str(err):
                    raise BackendError("prompt_too_long", 400, "the prompt does not fit the model's context "
                                       f"window ({self._llm.n_ctx()} tokens)") from None
                raise
        choice, usage = out["choices"][0], out.get("usage", {})
        return Generation(choice["text"], usage.get("prompt_tokens"), usage.get("completion_tokens"),
                          choice.get("finish_reason"))

    def health(self) -> tuple[bool, str]:
        return True, "model loaded"

    def close(self) -> None:
        with self._lock:
            self._llm.close()


class OllamaBackend:
    """The Ollama HTTP API (`/api/generate`, raw mode: the prompt is already in the chat template).

    The server is found like the official client finds it: `host`, else $OLLAMA_HOST, else 127.0.0.1:11434.
    """

    name = "ollama"

    def __init__(self, model: str, host: str | None = None, timeout: float = 600.0):
        import ollama

        self.model = model
        self._client = ollama.Client(host=host, timeout=timeout)
        self._probe = ollama.Client(host=host, timeout=5.0)
        self.host = str(self._client._client.base_url)

    def generate(self, req: GenRequest) -> Generation:
        import httpx
        import ollama

        options = {"temperature": req.temperature, "top_p": req.top_p, "num_predict": req.max_tokens,
                   "stop": list(STOP_TOKENS)}
        if req.seed is not None:
            options["seed"] = req.seed
        try:
            r = self._client.generate(model=self.model, prompt=req.prompt, raw=True, options=options, stream=False)
        except ollama.ResponseError as err:
            raise BackendError("backend_error", 502 if err.status_code != 404 else 503,
                               f"Ollama answered HTTP {err.status_code} for model {self.model}") from None
        except httpx.TimeoutException:
            raise BackendError("backend_timeout", 504, "the Ollama server did not answer in time") from None
        except (ConnectionError, httpx.TransportError):
            raise BackendError("backend_unavailable", 503, f"no Ollama server at {self.host}") from None
        return Generation(r.response or "", r.prompt_eval_count, r.eval_count, r.done_reason)

    def health(self) -> tuple[bool, str]:
        import httpx
        import ollama

        try:
            self._probe.show(self.model)
        except ollama.ResponseError as err:
            return False, f"Ollama at {self.host} answered HTTP {err.status_code} for model {self.model}"
        except (ConnectionError, httpx.HTTPError):
            return False, f"no Ollama server at {self.host}"
        return True, f"Ollama at {self.host} has {self.model}"

    def close(self) -> None:
        self._client._client.close()
        self._probe._client.close()


class FixedOutputBackend:
    """NOT A MODEL: returns preset replies, for testing the format gate and for the API-overhead benchmark.

    `reply` is a string or a function of the rendered prompt; `delay_s` simulates generation time.
    """

    name = "fixed-output"

    def __init__(self, reply: str | Callable[[str], str], model: str = "fixed-output", delay_s: float = 0.0):
        self.model = model
        self._reply = reply
        self.delay_s = delay_s
        self.calls: list[GenRequest] = []

    def generate(self, req: GenRequest) -> Generation:
        self.calls.append(req)
        if self.delay_s:
            time.sleep(self.delay_s)
        text = self._reply(req.prompt) if callable(self._reply) else self._reply
        return Generation(text, None, None, "stop")

    def health(self) -> tuple[bool, str]:
        return True, "fixed output (test backend, not a model)"

    def close(self) -> None:
        pass
