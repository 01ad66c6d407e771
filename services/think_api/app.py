"""The think API (FastAPI): prompt in, final answer out, thinking never; every request audited.

    POST /think                {"prompt": "...", "max_tokens": 512, "temperature": 0.7, "top_p": 0.9, "seed": 1}
                               (the prototype's fields work too: "query", "max_new_tokens", "user_id")
                            -> {"answer", "safety_label", "escalated", "internal_reasoning_hash", "request_id", ...}
    POST /v1/chat/completions  the OpenAI protocol, streamed or not (services/think_api/chat.py)
    GET  /v1/models            the one model served
    GET  /healthz           -> {"status": "ok", "backend", "model", "detail"} (503 while the backend or the audit
                               log is not ready)

Errors are JSON `{"error": {"code", "message"}, "request_id"}` with a status code, never a stack trace (/v1 adds
the OpenAI fields `type` and `param`). When $SO8T_API_KEY is set, the model routes need `Authorization: Bearer
<key>` (or `X-API-Key: <key>`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.think_api import chat, openapi
from services.think_api.audit import AuditLog, AuditRecord
from services.think_api.chat_models import ChatCompletionChunk, ChatCompletionRequest
from services.think_api.errors import ApiError, ErrorBody, error_response
from services.think_api.generation import Backend
from services.think_api.http_input import check_key, read_body, validate_json
from services.think_api.prompts import build_prompt
from services.think_api.replies import audited, generate_gated, new_record
from services.think_api.serve_settings import ServeSettings, check_limits, sampling
from shared import logs

log = logs.get("think-api")
API_KEY_ENV = "SO8T_API_KEY"
__all__ = [
    "API_KEY_ENV",
    "ApiError",
    "ServeSettings",
    "ThinkRequest",
    "ThinkResponse",
    "build_prompt",
    "create_app",
    "serve_background",
]


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
    def _one_of_each(self) -> ThinkRequest:
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


class Health(BaseModel):
    status: str  # ok | unavailable
    backend: str
    model: str
    detail: str


def _health(backend: Backend, audit: AuditLog) -> tuple[bool, str]:
    try:
        ok, detail = backend.health()
    except Exception as err:  # a health check never takes the server down
        return False, f"the backend's health check failed ({type(err).__name__})"
    if not ok:
        return ok, detail
    try:
        audit.check()
    except Exception as err:
        return False, f"the audit log cannot be written ({type(err).__name__})"
    return ok, detail


def create_app(backend: Backend, audit: AuditLog, settings: ServeSettings | None = None) -> FastAPI:
    s = settings or ServeSettings()
    app = FastAPI(
        title="SO8T /think API",
        version="2",
        docs_url="/docs",
        redoc_url=None,
        description=(__doc__ or "").split("\n\n")[0],
    )
    app.state.backend, app.state.audit, app.state.settings = backend, audit, s

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code,
            "http_error",
            str(exc.detail),
            headers=getattr(exc, "headers", None),
            openai=request.url.path.startswith("/v1/"),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return error_response(500, "internal_error", "internal error", openai=request.url.path.startswith("/v1/"))

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> JSONResponse:
        ok, detail = await run_in_threadpool(_health, backend, audit)
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "backend": backend.name,
                "model": backend.model,
                "detail": detail,
            },
            status_code=200 if ok else 503,
        )

    async def think_reply(request: Request, row: AuditRecord) -> Response:
        check_key(request, s.api_key)
        req = validate_json(await read_body(request, s.max_request_bytes), ThinkRequest)
        row.prompt_chars = len(req.text)
        max_tokens = req.max_tokens or req.max_new_tokens
        check_limits(len(req.text), max_tokens, [req.text], s)
        gen_req = sampling(s, build_prompt(req.text, s.format), max_tokens, req.temperature, req.top_p, req.seed)
        _, d = await generate_gated(backend, gen_req, req.text, row)
        body = ThinkResponse(
            answer=d.answer,
            safety_label=d.label,
            escalated=d.escalated,
            internal_reasoning_hash=d.thinking_sha256,
            request_id=row.request_id,
            status=d.status,
            model=backend.model,
            detail=d.reason,
        )
        return JSONResponse(body.model_dump(), status_code=d.http_status)

    @app.post(
        "/think",
        response_model=ThinkResponse,
        openapi_extra=openapi.request_body(ThinkRequest),
        responses={
            502: openapi.one_of(
                "the reply was withheld (ThinkResponse, status withheld), or " + openapi.WHY[502],
                ThinkResponse,
                ErrorBody,
            ),
            **openapi.error_responses(ErrorBody, 400, 401, 413, 422, 500, 503, 504),
        },
    )
    async def think(request: Request) -> Response:
        row = new_record(backend, "/think")
        return await audited(audit, row, lambda: think_reply(request, row))

    chat.add_routes(app, backend, audit, s)
    openapi.install(app, requests=[ThinkRequest, ChatCompletionRequest], extra=[ChatCompletionChunk])
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
