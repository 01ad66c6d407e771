"""The one path of a model request, whichever protocol asked: backend -> shared parser -> label gate -> audit row.

`audited` wraps a route: it writes the request's row (rejections and errors included) before the response leaves,
and gives no answer it could not audit. A streamed response writes its own row when it ends (openai/stream.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.think_api import gate
from services.think_api.admission import CANCELLED, Admission, ClientGone, ClientWatch
from services.think_api.audit import AuditLog, AuditRecord
from services.think_api.backends.protocol import Backend, BackendError, Generation, GenRequest
from services.think_api.backends.pump import BackendPump
from services.think_api.secret import ServerSecret
from services.think_api.settings import ServeSettings
from services.think_api.web.errors import ApiError, api_error_response, error_response
from services.think_api.web.input import read_body
from shared import logs

log = logs.get("think-api")
# refusals before a request is authenticated and parsed: anyone can make them, so they cost no row each
# (AuditLog.tally); a request that parsed has its row
TALLIED = frozenset(
    {"unauthorized", "bad_request", "invalid_json", "json_too_deep", "request_too_large", "unsupported_media_type"}
)


def new_record(backend: Backend, endpoint: str, stream: bool = False) -> AuditRecord:
    """The audit record of a request that just arrived: the one place a record is created."""
    return AuditRecord(
        request_id=uuid.uuid4().hex,
        model=backend.model,
        backend=backend.name,
        escalated=False,
        endpoint=endpoint,
        stream=stream,
    )


def record_decision(row: AuditRecord, d: gate.Decision, output: str, sent: str, secret: ServerSecret) -> None:
    """The audit columns of a gated reply: keyed digests and lengths of the thinking, of the raw output and of `sent`
    (the answer text the client got), never the texts."""
    row.status, row.error, row.label, row.escalated = d.status, d.reason, d.label, d.escalated
    row.thinking_sha256, row.thinking_chars = d.thinking_hmac, d.thinking_chars
    record_sent(row, output, sent, secret)


def record_sent(row: AuditRecord, output: str, sent: str, secret: ServerSecret) -> None:
    """HMAC-SHA256 digests under the server secret (the columns keep their first names) and lengths of the raw
    output, which holds the thinking, and of the answer text the client got."""
    row.answer_sha256, row.answer_chars = secret.digest(sent), len(sent)
    row.output_sha256, row.output_chars = secret.digest(output), len(output)


def secret_of(request: Request) -> ServerSecret:
    """The server secret: the audit log's key, which also keys every digest of the thinking that leaves."""
    audit: AuditLog = request.app.state.audit
    return audit.secret


def record_usage(row: AuditRecord, gen: Generation) -> None:
    row.prompt_tokens, row.completion_tokens = gen.prompt_tokens, gen.completion_tokens


def backend_api_error(err: BackendError) -> ApiError:
    """A backend's failure as the client sees it; a timed-out generation is not worth the client's retry."""
    return ApiError(err.http_status, err.code, err.message, retry=False if err.http_status == 504 else None)


async def read_body_in_time(request: Request, s: ServeSettings) -> bytes:
    """The bounded body, sent within `body_timeout_s` (else 408: a slowly-sent body holds no one up for long)."""
    with anyio.move_on_after(s.body_timeout_s):
        return await read_body(request, s.max_request_bytes)
    raise ApiError(408, "request_timeout", f"the request body was not sent within {s.body_timeout_s:g} s")


def admission_of(request: Request) -> Admission:
    adm: Admission = request.app.state.admission
    return adm


async def start_generation(
    request: Request, backend: Backend, req: GenRequest, watch: ClientWatch
) -> tuple[BackendPump, float]:
    """Admitted (429 when the waiting room is full; ClientGone when the client leaves while waiting), the backend
    started in a thread of its own, which gives the slot back when it ends; and the moment it started."""
    admission = admission_of(request)
    await admission.enter(watch)
    t0 = time.perf_counter()
    return BackendPump(backend, req, on_end=admission.leave_threadsafe), t0


async def generate_gated(
    request: Request, backend: Backend, req: GenRequest, gate_prompt: str, row: AuditRecord
) -> tuple[Generation, gate.Decision]:
    """A whole reply from the backend (its stream, so a client that goes stops it at the next token), gated; the
    row gets every figure of it."""
    async with admission_of(request).watching(request) as watch:
        pump, t0 = await start_generation(request, backend, req, watch)
        try:
            gen = await pump.whole(watch.gone)
        except BackendError as err:
            raise backend_api_error(err) from None
        finally:
            pump.stop()
            row.backend_ms = (time.perf_counter() - t0) * 1000
    if gen is None:
        raise ClientGone()
    d = gate.decide(gen.text, gate_prompt, secret_of(request))
    record_decision(row, d, gen.text, d.answer, secret_of(request))
    record_usage(row, gen)
    return gen, d


async def audited(
    audit: AuditLog, row: AuditRecord, handle: Callable[[], Awaitable[Response]], openai: bool = False
) -> Response:
    rid = row.request_id
    try:
        resp = await handle()
    except ApiError as err:
        row.status, row.error = ("rejected" if err.http_status < 500 else "error"), err.code
        if err.code == CANCELLED:
            row.status = "cancelled"
        resp = api_error_response(err, rid, openai)
    except Exception as err:  # logged here by type only; the client gets a plain JSON 500
        log.error("request %s failed: %s", rid, type(err).__name__)
        row.status, row.error = "error", "internal_error"
        resp = error_response(500, "internal_error", "internal error", rid, openai=openai)
    if row.status == "rejected" and row.error in TALLIED:  # counted per minute, not a fsynced row each
        await run_in_threadpool(audit.tally, row.finish(resp.status_code))
    elif not isinstance(resp, StreamingResponse):
        try:
            await run_in_threadpool(audit.append, row.finish(resp.status_code))
        except Exception as err:  # fail closed: an answer that cannot be audited is not given
            log.error("audit write failed for request %s: %s", rid, err)
            return error_response(
                503, "audit_unavailable", "the request could not be audited; no answer is given", rid, openai=openai
            )
    resp.headers["X-Request-ID"] = rid
    return resp
