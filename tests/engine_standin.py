"""NOT A MODEL: a stand-in OpenAI-compatible engine (`/v1/models`, `/v1/completions` whole and SSE-streamed) that
answers with vLLM's shapes, errors included, for testing the `openai` backend without an engine.

`reply(prompt) -> text` decides the completion; `mode` makes it misbehave the ways an engine does:
ok | not_found (vLLM's 404 for an unknown model) | context (vLLM's 400 for a prompt over max_model_len) |
overloaded (503) | error_mid_stream (a stream that sends an error event after some text) | bad_json | no_done (a
stream that ends without [DONE]) | slow (sleeps past the client's timeout).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def vllm_error(message: str, kind: str, code: int) -> dict[str, Any]:
    """vLLM's ErrorResponse (the OpenAI error object under "error")."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class EngineStandIn:
    def __init__(self, reply: Callable[[str], str], model: str = "tiny", piece_chars: int = 3):
        self.reply, self.model, self.piece_chars = reply, model, piece_chars
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._json(200, {"object": "list", "data": [{"id": engine.model, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                engine.requests.append(body)
                error = engine._error(body)
                if error is not None:
                    self._json(*error)
                elif body.get("stream"):
                    try:
                        engine._stream(self, body)
                    except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: it may
                        pass
                else:
                    text = engine.reply(body["prompt"])
                    self._json(200, engine._completion(text))

        return Handler

    def _error(self, body: dict[str, Any]) -> tuple[int, Any] | None:
        if self.mode == "slow":
            time.sleep(3)
        if self.mode == "not_found" or body.get("model") != self.model:
            return 404, vllm_error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404)
        if self.mode == "context":
            msg = "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens."
            return 400, vllm_error(msg, "BadRequestError", 400)
        if self.mode == "overloaded":
            return 503, vllm_error("The engine is overloaded", "ServiceUnavailableError", 503)
        if self.mode == "bad_json":
            return 200, b'{"choices": "nope"'
        return None

    def _completion(self, text: str) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 11, "completion_tokens": len(text), "total_tokens": 11 + len(text)},
        }

    def _stream(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        text = self.reply(body["prompt"])
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()

        def event(obj: Any) -> None:
            h.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            h.wfile.flush()

        pieces = [text[i : i + self.piece_chars] for i in range(0, len(text), self.piece_chars)]
        for n, piece in enumerate(pieces):
            if self.mode == "error_mid_stream" and n == 2:
                event(vllm_error("CUDA error: an illegal memory access", "InternalServerError", 500))
                return
            event({"object": "text_completion", "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        event({"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            event({"object": "text_completion", "choices": [], "usage": self._completion(text)["usage"]})
        if self.mode != "no_done":
            h.wfile.write(b"data: [DONE]\n\n")
