"""The one path of a model request, whichever protocol asked: backend -> shared parser -> label gate -> audit row.

`audited` wraps a route: it writes the request's row (rejections and errors included) before the response leaves,
and gives no answer it could not audit. A streamed response writes its own row when it ends (openai/stream.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.think_api import gate
from services.think_api.audit import AuditLog, AuditRecord
from services.think_api.backends.protocol import Backend, BackendError, Generation, GenRequest
from services.think_api.web.errors import ApiError, api_error_response, error_response
from shared import logs

log = logs.get("think-api")


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


def record_decision(row: AuditRecord, d: gate.Decision, output: str, sent: str) -> None:
    """The audit columns of a gated reply: hashes and lengths of the thinking, of the raw output and of `sent` (the
    answer text the client got), never the texts."""
    row.status, row.error, row.label, row.escalated = d.status, d.reason, d.label, d.escalated
    row.thinking_sha256, row.thinking_chars = d.thinking_sha256, d.thinking_chars
    record_sent(row, output, sent)


def record_sent(row: AuditRecord, output: str, sent: str) -> None:
    """Hashes and lengths of the raw output and of the answer text the client got."""
    row.answer_sha256, row.answer_chars = gate.sha256(sent), len(sent)
    row.output_sha256, row.output_chars = gate.sha256(output), len(output)


def record_usage(row: AuditRecord, gen: Generation) -> None:
    row.prompt_tokens, row.completion_tokens = gen.prompt_tokens, gen.completion_tokens


def backend_api_error(err: BackendError) -> ApiError:
    """A backend's failure as the client sees it; a timed-out generation is not worth the client's retry."""
    return ApiError(err.http_status, err.code, err.message, retry=False if err.http_status == 504 else None)


async def generate_gated(
    backend: Backend, req: GenRequest, gate_prompt: str, row: AuditRecord
) -> tuple[Generation, gate.Decision]:
    """A whole reply from the backend, gated; the row gets every figure of it."""
    t0 = time.perf_counter()
    try:
        gen = await run_in_threadpool(backend.generate, req)
    except BackendError as err:
        raise backend_api_error(err) from None
    finally:
        row.backend_ms = (time.perf_counter() - t0) * 1000
    d = gate.decide(gen.text, gate_prompt)
    record_decision(row, d, gen.text, d.answer)
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
        resp = api_error_response(err, rid, openai)
    except Exception as err:  # logged here by type only; the client gets a plain JSON 500
        log.error("request %s failed: %s", rid, type(err).__name__)
        row.status, row.error = "error", "internal_error"
        resp = error_response(500, "internal_error", "internal error", rid, openai=openai)
    if not isinstance(resp, StreamingResponse):
        try:
            await run_in_threadpool(audit.append, row.finish(resp.status_code))
        except Exception as err:  # fail closed: an answer that cannot be audited is not given
            log.error("audit write failed for request %s: %s", rid, err)
            return error_response(
                503, "audit_unavailable", "the request could not be audited; no answer is given", rid, openai=openai
            )
    resp.headers["X-Request-ID"] = rid
    return resp
