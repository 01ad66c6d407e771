"""The think API (FastAPI): prompt in, final answer out, thinking never; every request audited.

    POST /think                {"prompt": "...", "max_tokens": 512, "temperature": 0.7, "top_p": 0.9, "seed": 1}
                               (the prototype's fields work too: "query", "max_new_tokens", "user_id")
                            -> {"answer", "safety_label", "escalated", "internal_reasoning_hash", "request_id", ...}
                               (think.py)
    POST /v1/chat/completions  the OpenAI protocol, streamed or not (openai/routes.py, openai/stream.py)
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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.think_api import think
from services.think_api.admission import Admission
from services.think_api.audit import AuditLog
from services.think_api.backends import Backend
from services.think_api.connections import ConnectionLimits, server_config
from services.think_api.openai import routes as openai_routes
from services.think_api.openai.models import ChatCompletionChunk, ChatCompletionRequest
from services.think_api.prompts import build_prompt
from services.think_api.replies import new_record
from services.think_api.settings import ServeSettings
from services.think_api.think import ThinkRequest, ThinkResponse
from services.think_api.web import openapi
from services.think_api.web.errors import ApiError, error_response
from services.think_api.web.guard import Guard
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
    """The server: errors as JSON, /healthz, POST /think, the OpenAI routes, the completed OpenAPI schema."""
    s = settings or ServeSettings()
    app = FastAPI(
        title="SO8T /think API",
        version="2",
        docs_url="/docs",
        redoc_url=None,
        description=(__doc__ or "").split("\n\n")[0],
    )
    app.state.backend, app.state.audit, app.state.settings = backend, audit, s
    app.router.add_event_handler("shutdown", audit.flush)  # the tally and the head anchor, before the process ends
    # at most `parallel` generations (default: what the backend runs at once), `max_queue` waiting, then 429
    app.state.admission = Admission(s.parallel or int(getattr(backend, "parallel", 1)), s.max_queue, s.retry_after_s)
    _error_handlers(app)
    _health_route(app, backend, audit)
    think.add_routes(app, backend, audit, s)
    openai_routes.add_routes(app, backend, audit, s)
    openapi.install(app, requests=[ThinkRequest, ChatCompletionRequest], extra=[ChatCompletionChunk])
    _guard(app, backend, audit, s)
    return app


def _guard(app: FastAPI, backend: Backend, audit: AuditLog, s: ServeSettings) -> None:
    """The Host allow-list and JSON-only POSTs before any route (web/guard.py), refusals tallied; CORS only for the
    configured origins."""

    def refused(path: str, status: int, code: str) -> None:
        row = new_record(backend, path)
        row.status, row.error, row.http_status = "rejected", code, status
        audit.tally(row)

    app.add_middleware(Guard, allowed_hosts=s.allowed_hosts, refused=refused)
    if s.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=s.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )


def _error_handlers(app: FastAPI) -> None:
    """Whatever goes wrong outside a route's own handling is JSON in the shape of its protocol, never a trace."""

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


HEALTH_MAX_AGE_S = 1.0  # while requests wait for a generation, /healthz answers from a probe at most this old


def _health_route(app: FastAPI, backend: Backend, audit: AuditLog) -> None:
    last: list[tuple[float, tuple[bool, str]]] = []

    async def probe() -> tuple[bool, str]:
        """A fresh probe, except while the server is overloaded (requests waiting): then the last one of the past
        second, so a probe never queues behind the audit writes and engine calls of a request storm."""
        busy = app.state.admission.waiting > 0
        if busy and last and time.monotonic() - last[0][0] < HEALTH_MAX_AGE_S:
            return last[0][1]
        result = await run_in_threadpool(_health, backend, audit)
        last[:] = [(time.monotonic(), result)]
        return result

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> JSONResponse:
        ok, detail = await probe()
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "backend": backend.name,
                "model": backend.model,
                "detail": detail,
            },
            status_code=200 if ok else 503,
        )


@contextlib.contextmanager
def serve_background(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, limits: ConnectionLimits | None = None
) -> Iterator[str]:
    """Run `app` under uvicorn in a thread of this process (tests, benchmarks); yields its base URL."""
    import uvicorn

    config = server_config(app, host, port, limits or ConnectionLimits(), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
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
