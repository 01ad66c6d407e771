"""Any OpenAI-compatible engine (llama.cpp's `llama-server`, vLLM, SGLang) through its `/v1/completions`, whole or
streamed (SSE), with our own rendered Phi-3.5 prompt: raw text in, raw text out, so no server-side chat template or
reasoning parser touches the reply before the gate does.

`base_url` is the engine's base ending in `/v1`. Whatever the engine does (not there, slow, HTTP errors in
llama.cpp's or vLLM's shapes, an error event mid-stream, a body that is not a completion), a request gets a
BackendError with a clear code and status, never the engine's text (it may quote the prompt or the thinking), and
`health` a reason: the model must be listed by `/v1/models`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from services.think_api.backends.protocol import BackendError, Generation, GenRequest, StreamItem
from shared.think_format import STOP_TOKENS

_BAD_BODY = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def read_key_file(path: str | Path | None) -> str | None:
    """The engine's API key from a file (never a flag: it would show in `ps`); None without a file."""
    if path is None:
        return None
    key = Path(path).read_text().strip()
    if not key:
        raise ValueError(f"{path}: the upstream key file is empty")
    return key


def _engine_error(status: int, body: bytes) -> tuple[str, int]:
    """(code, status for our client) of an engine's HTTP error; its message is read only to classify it."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        message = str(err.get("message", "")).lower() if isinstance(err, dict) else str(err).lower()
    except ValueError:
        message = ""
    if status == 404 or "does not exist" in message or "model not found" in message:
        return "backend_model_not_found", 503
    if status == 400 and ("context" in message or "too long" in message or "exceed" in message):
        return "prompt_too_long", 400
    if status in (429, 503):
        return "backend_busy", 503
    return "backend_error", 502


class OpenAICompatBackend:
    """`timeout` bounds each wait on the engine (connecting, and each read: a whole reply, or one streamed part)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        probe_timeout: float = 5.0,
        parallel: int = 4,
    ):
        self.base_url, self.model, self.timeout, self.parallel = base_url.rstrip("/"), model, timeout, parallel
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._client = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        self._probe_timeout = min(probe_timeout, timeout)

    def _body(self, req: GenRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": list(STOP_TOKENS),
            "stream": stream,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise BackendError(
                "backend_timeout", 504, f"the engine at {self.base_url} did not answer within {self.timeout:g} s"
            ) from None
        except httpx.TransportError:
            raise BackendError("backend_unavailable", 503, f"no engine answering at {self.base_url}") from None
        except _BAD_BODY:
            raise BackendError(
                "backend_bad_response", 502, "the engine answered with a body that is not a completion"
            ) from None

    def _check(self, r: httpx.Response) -> None:
        if r.status_code != 200:
            code, status = _engine_error(r.status_code, r.read())
            raise BackendError(code, status, f"the engine answered HTTP {r.status_code} for model {self.model}")

    def generate(self, req: GenRequest) -> Generation:
        with self._errors():
            r = self._client.post(f"{self.base_url}/completions", json=self._body(req, stream=False))
            self._check(r)
            data = r.json()
            choice, use = data["choices"][0], data.get("usage") or {}
            if not isinstance(choice["text"], str):
                raise TypeError("text")
            return Generation(
                choice["text"], use.get("prompt_tokens"), use.get("completion_tokens"), choice.get("finish_reason")
            )

    def stream(self, req: GenRequest) -> Iterator[StreamItem]:
        parts: list[str] = []
        finish: str | None = None
        use: dict[str, Any] = {}
        with (
            self._errors(),
            self._client.stream("POST", f"{self.base_url}/completions", json=self._body(req, stream=True)) as r,
        ):
            self._check(r)
            for data in _sse_events(r):
                if data == "[DONE]":
                    yield Generation("".join(parts), use.get("prompt_tokens"), use.get("completion_tokens"), finish)
                    return
                event = json.loads(data)
                if "error" in event or event.get("object") == "error":
                    raise BackendError("backend_error", 502, f"the engine's stream failed for model {self.model}")
                use = event.get("usage") or use
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    if choice.get("text"):
                        parts.append(str(choice["text"]))
                        yield str(choice["text"])
        raise BackendError("backend_bad_response", 502, "the engine's stream ended before its last part")

    def health(self) -> tuple[bool, str]:
        try:
            r = self._client.get(f"{self.base_url}/models", timeout=self._probe_timeout)
            if r.status_code != 200:
                return False, f"the engine at {self.base_url} answered /models with HTTP {r.status_code}"
            ids = [m["id"] for m in r.json()["data"]]
        except httpx.TimeoutException:
            return False, f"the engine at {self.base_url} did not answer in time"
        except httpx.HTTPError:
            return False, f"no engine answering at {self.base_url}"
        except _BAD_BODY:
            return False, f"the engine at {self.base_url} answered /models with a body that is not a model list"
        if self.model not in ids:
            return False, f"the engine at {self.base_url} does not serve {self.model} (it lists {len(ids)} models)"
        return True, f"the engine at {self.base_url} serves {self.model}"

    def close(self) -> None:
        self._client.close()


def _sse_events(r: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream (comments and other fields skipped)."""
    for line in r.iter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()
        elif line.startswith("error:"):  # llama-server names a failed stream's event so
            yield json.dumps({"error": line[6:].strip()})
