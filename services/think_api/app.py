"""The /think API (FastAPI): prompt in, final answer out, thinking never; every request audited.

    POST /think  {"prompt": "...", "max_tokens": 512, "temperature": 0.7, "top_p": 0.9, "seed": 1}
                 (the prototype's fields work too: "query", "max_new_tokens", "user_id")
              -> {"answer", "safety_label", "escalated", "internal_reasoning_hash", "request_id", "status", ...}
    GET /healthz -> {"status": "ok", "backend", "model"} (503 while the backend is not ready)

Errors are JSON `{"error": {"code", "message"}, "request_id"}` with a status code, never a stack trace.
When $SO8T_API_KEY is set, /think needs `Authorization: Bearer <key>` (or `X-API-Key: <key>`).
"""
from __future__ import annotations

import contextlib
import hmac
import json
import threading
import time
import uuid
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.think_api import gate
from services.think_api.audit import AuditLog
from services.think_api.backends import Backend, BackendError, GenRequest
from shared import logs
from shared.config import StrictModel
from shared.think_format import Format, has_template_token, render_chat, system_prompt

log = logs.get("think-api")
API_KEY_ENV = "SO8T_API_KEY"


class ServeSettings(StrictModel):
    format: Format = "simple"  # the /think format the model was trained on (its system prompt)
    max_request_bytes: int = Field(64 * 1024, gt=0)
    max_prompt_chars: int = Field(8000, gt=0)
    max_tokens_limit: int = Field(2048, gt=0)
    default_max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0, le=2)  # the prototype's sampling defaults
    top_p: float = Field(0.9, gt=0, le=1)
    api_key: str | None = None


class ThinkRequest(BaseModel):
    """`prompt` (or the prototype's `query`); `max_tokens` (or `max_new_tokens`). `user_id` is accepted from the
    prototype's clients and not stored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1)
    query: str | None = Field(None, min_length=1)
    user_id: str | None = Field(None, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _one_of_each(self) -> "ThinkRequest":
        if (self.prompt is None) == (self.query is None):
            raise ValueError("give exactly one of 'prompt' or 'query'")
        if self.max_tokens is not None and self.max_new_tokens is not None:
            raise ValueError("give at most one of 'max_tokens' or 'max_new_tokens'")
        return self

    @property
    def text(self) -> str:
        return self.prompt if self.prompt is not None else self.query  # type: ignore[return-value]


class ThinkResponse(BaseModel):
    answer: str
    safety_label: str | None
    escalated: bool
    internal_reasoning_hash: str | None  # SHA-256 of the thinking; null when the reply did not parse
    request_id: str
    status: str  # answered | denied | refused | escalated | withheld
    model: str
    detail: str | None = None  # why a reply was withheld


class ApiError(Exception):
    def __init__(self, http_status: int, code: str, message: str, fields: list[dict] | None = None):
        super().__init__(message)
        self.http_status, self.code, self.message, self.fields = http_status, code, message, fields


def error_response(http_status: int, code: str, message: str, request_id: str | None = None,
                   fields: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    err: dict[str, Any] = {"code": code, "message": message}
    if fields:
        err["fields"] = fields
    return JSONResponse({"error": err, "request_id": request_id}, status_code=http_status, headers=headers)


def build_prompt(user_text: str, fmt: Format) -> str:
    return render_chat([{"role": "system", "content": system_prompt(fmt)}, {"role": "user", "content": user_text}],
                       add_generation_prompt=True)


def _check_key(request: Request, key: str | None) -> None:
    if not key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(declared) > limit:
            raise ApiError(413, "request_too_large", f"request body over {limit} bytes")
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"request body over {limit} bytes")
        body.append(chunk)
    return b"".join(body)


def _parse_request(raw: bytes, s: ServeSettings) -> ThinkRequest:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    try:
        req = ThinkRequest.model_validate(data)
    except ValidationError as err:  # field names and rules only: never echo the input back
        fields = [{"field": ".".join(str(p) for p in e["loc"]) or "<body>", "message": e["msg"]} for e in err.errors()]
        raise ApiError(422, "invalid_request", "the request does not validate", fields) from None
    if len(req.text) > s.max_prompt_chars:
        raise ApiError(422, "prompt_too_long", f"the prompt is over {s.max_prompt_chars} characters")
    max_tokens = req.max_tokens or req.max_new_tokens
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise ApiError(422, "max_tokens_too_large", f"max_tokens is over the limit of {s.max_tokens_limit}")
    if has_template_token(req.text):
        raise ApiError(400, "template_token_in_prompt", "the prompt contains a chat-template token (<|...|>)")
    return req


def create_app(backend: Backend, audit: AuditLog, settings: ServeSettings | None = None) -> FastAPI:
    s = settings or ServeSettings()
    app = FastAPI(title="SO8T /think API", version="1", docs_url="/docs", redoc_url=None)
    app.state.backend, app.state.audit, app.state.settings = backend, audit, s

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return error_response(500, "internal_error", "internal error")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok, detail = await run_in_threadpool(backend.health)
        return JSONResponse({"status": "ok" if ok else "unavailable", "backend": backend.name,
                             "model": backend.model, "detail": detail}, status_code=200 if ok else 503)

    async def handle(request: Request, rid: str, row: dict[str, Any]) -> JSONResponse:
        _check_key(request, s.api_key)
        req = _parse_request(await _read_body(request, s.max_request_bytes), s)
        row["prompt_chars"] = len(req.text)
        gen_req = GenRequest(build_prompt(req.text, s.format), req.max_tokens or req.max_new_tokens or
                             s.default_max_tokens, s.temperature if req.temperature is None else req.temperature,
                             req.top_p or s.top_p, req.seed)
        t0 = time.perf_counter()
        try:
            gen = await run_in_threadpool(backend.generate, gen_req)
        except BackendError as err:
            raise ApiError(err.http_status, err.code, err.message) from None
        finally:
            row["backend_ms"] = (time.perf_counter() - t0) * 1000
        d = gate.decide(gen.text, req.text)
        row.update(status=d.status, error=d.reason, label=d.label, escalated=d.escalated,
                   thinking_sha256=d.thinking_sha256, answer_sha256=gate.sha256(d.answer),
                   output_sha256=gate.sha256(gen.text), thinking_chars=d.thinking_chars, answer_chars=len(d.answer),
                   output_chars=len(gen.text), prompt_tokens=gen.prompt_tokens,
                   completion_tokens=gen.completion_tokens)
        body = ThinkResponse(answer=d.answer, safety_label=d.label, escalated=d.escalated,
                             internal_reasoning_hash=d.thinking_sha256, request_id=rid, status=d.status,
                             model=backend.model, detail=d.reason)
        return JSONResponse(body.model_dump(), status_code=d.http_status)

    @app.post("/think")
    async def think(request: Request) -> JSONResponse:
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        row: dict[str, Any] = {"request_id": rid, "model": backend.model, "backend": backend.name, "escalated": 0}
        try:
            resp = await handle(request, rid, row)
        except ApiError as err:
            row.update(status="rejected" if err.http_status < 500 else "error", error=err.code)
            headers = {"WWW-Authenticate": "Bearer"} if err.http_status == 401 else None
            resp = error_response(err.http_status, err.code, err.message, rid, err.fields, headers)
        except Exception as err:  # logged here by type only; the client gets a plain JSON 500
            log.error("request %s failed: %s", rid, type(err).__name__)
            row.update(status="error", error="internal_error")
            resp = error_response(500, "internal_error", "internal error", rid)
        row.update(http_status=resp.status_code, latency_ms=(time.perf_counter() - t0) * 1000)
        try:
            await run_in_threadpool(audit.append, row)
        except Exception as err:  # fail closed: an answer that cannot be audited is not given
            log.error("audit write failed for request %s: %s", rid, err)
            return error_response(503, "audit_unavailable", "the request could not be audited; no answer is given",
                                  rid)
        resp.headers["X-Request-ID"] = rid
        return resp

    return app


@contextlib.contextmanager
def serve_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn in a thread of this process (tests, benchmarks); yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
