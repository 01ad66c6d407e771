"""The Ollama HTTP API (`/api/generate`, raw mode: the prompt is already in the chat template), whole or streamed.

Whatever the server does (not there, slow, HTTP errors, a body that is not what the API documents), a request
gets a BackendError with a clear code and status, and `health` a reason: the think API stays up and recovers
when the server does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from services.think_api.backends.protocol import BackendError, Generation, GenRequest, StreamItem
from shared.think_format import STOP_TOKENS

# A body the client cannot read: not JSON (ValueError), JSON of another shape (TypeError, AttributeError), fields
# that do not validate (pydantic's ValidationError is a ValueError).
_BAD_BODY = (ValueError, TypeError, AttributeError, KeyError)


class OllamaBackend:
    """The server is found like the official client finds it: `host`, else $OLLAMA_HOST, else 127.0.0.1:11434.
    `timeout` bounds each wait on the server (connecting, and each read: a whole reply, or one streamed part)."""

    name = "ollama"
    parallel = 4  # admission's default: Ollama's own OLLAMA_NUM_PARALLEL default (set --parallel to match yours)

    def __init__(self, model: str, host: str | None = None, timeout: float = 600.0, probe_timeout: float = 5.0):
        import ollama

        self.model = model
        self.timeout = timeout
        self._client = ollama.Client(host=host, timeout=timeout)
        self._probe = ollama.Client(host=host, timeout=min(probe_timeout, timeout))
        self.host = str(self._client._client.base_url)

    def _options(self, req: GenRequest) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "num_predict": req.max_tokens,
            "stop": list(STOP_TOKENS),
        }
        if req.seed is not None:
            options["seed"] = req.seed
        return options

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Ollama's and the transport's failures as BackendErrors (never with the server's text: it may quote)."""
        import httpx
        import ollama

        try:
            yield
        except ollama.ResponseError as err:
            if err.status_code == 404:
                raise BackendError(
                    "backend_model_not_found", 503, f"the Ollama server has no model {self.model}"
                ) from None
            status = f"HTTP {err.status_code}" if err.status_code > 0 else "an error in its stream"
            raise BackendError("backend_error", 502, f"Ollama answered {status} for model {self.model}") from None
        except httpx.TimeoutException:
            raise BackendError(
                "backend_timeout", 504, f"the Ollama server did not answer within {self.timeout:g} s"
            ) from None
        except (ConnectionError, httpx.TransportError):
            raise BackendError("backend_unavailable", 503, f"no Ollama server at {self.host}") from None
        except _BAD_BODY:
            raise BackendError(
                "backend_bad_response", 502, "the Ollama server answered with a body that is not a generation"
            ) from None

    def generate(self, req: GenRequest) -> Generation:
        with self._errors():
            r = self._client.generate(
                model=self.model, prompt=req.prompt, raw=True, options=self._options(req), stream=False
            )
            return Generation(r.response or "", r.prompt_eval_count, r.eval_count, r.done_reason)

    def stream(self, req: GenRequest) -> Iterator[StreamItem]:
        parts: list[str] = []
        with self._errors():
            for r in self._client.generate(
                model=self.model, prompt=req.prompt, raw=True, options=self._options(req), stream=True
            ):
                if r.response:
                    parts.append(r.response)
                    yield r.response
                if r.done:
                    yield Generation("".join(parts), r.prompt_eval_count, r.eval_count, r.done_reason)
                    return
        raise BackendError("backend_bad_response", 502, "the Ollama stream ended before its last part")

    def health(self) -> tuple[bool, str]:
        import httpx
        import ollama

        try:
            self._probe.show(self.model)
        except ollama.ResponseError as err:
            return False, f"Ollama at {self.host} answered HTTP {err.status_code} for model {self.model}"
        except httpx.TimeoutException:
            return False, f"Ollama at {self.host} did not answer in time"
        except (ConnectionError, httpx.HTTPError):
            return False, f"no Ollama server at {self.host}"
        except _BAD_BODY:
            return False, f"Ollama at {self.host} answered /api/show with a body that is not a model description"
        return True, f"Ollama at {self.host} has {self.model}"

    def close(self) -> None:
        self._client._client.close()
        self._probe._client.close()
