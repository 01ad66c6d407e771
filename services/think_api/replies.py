"""The one path of a model request, whichever protocol asked: backend -> shared parser -> label gate -> audit row.

`audited` wraps a route: it writes the request's row (rejections and errors included) before the response leaves,
and gives no answer it could not audit. A streamed response writes its own row when it ends (chat_stream).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.think_api import gate
from services.think_api.audit import AuditLog
from services.think_api.errors import ApiError, api_error_response, error_response
from services.think_api.generation import Backend, BackendError, Generation, GenRequest
from shared import logs

log = logs.get("think-api")


def new_row(backend: Backend, endpoint: str, stream: bool = False) -> dict[str, Any]:
    return {
        "request_id": uuid.uuid4().hex,
        "model": backend.model,
        "backend": backend.name,
        "escalated": 0,
        "endpoint": endpoint,
        "stream": int(stream),
        "_t0": time.perf_counter(),
    }


def decision_fields(d: gate.Decision, output: str, sent: str) -> dict[str, Any]:
    """The audit columns of a gated reply: hashes and lengths of the thinking, of the raw output and of `sent` (the
    answer text the client got), never the texts."""
    return {
        "status": d.status,
        "error": d.reason,
        "label": d.label,
        "escalated": d.escalated,
        "thinking_sha256": d.thinking_sha256,
        "answer_sha256": gate.sha256(sent),
        "output_sha256": gate.sha256(output),
        "thinking_chars": d.thinking_chars,
        "answer_chars": len(sent),
        "output_chars": len(output),
    }


def usage_fields(gen: Generation) -> dict[str, Any]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}


def backend_api_error(err: BackendError) -> ApiError:
    """A backend's failure as the client sees it; a timed-out generation is not worth the client's retry."""
    return ApiError(err.http_status, err.code, err.message, retry=False if err.http_status == 504 else None)


async def generate_gated(
    backend: Backend, req: GenRequest, gate_prompt: str, row: dict[str, Any]
) -> tuple[Generation, gate.Decision]:
    """A whole reply from the backend, gated; the row gets every figure of it."""
    t0 = time.perf_counter()
    try:
        gen = await run_in_threadpool(backend.generate, req)
    except BackendError as err:
        raise backend_api_error(err) from None
    finally:
        row["backend_ms"] = (time.perf_counter() - t0) * 1000
    d = gate.decide(gen.text, gate_prompt)
    row.update(decision_fields(d, gen.text, d.answer), **usage_fields(gen))
    return gen, d


def finish_row(row: dict[str, Any], http_status: int) -> dict[str, Any]:
    """The row as the audit log takes it: its HTTP status and latency added, the bookkeeping keys dropped."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out.update(http_status=http_status, latency_ms=(time.perf_counter() - row["_t0"]) * 1000)
    return out


async def audited(
    audit: AuditLog, row: dict[str, Any], handle: Callable[[], Awaitable[Response]], openai: bool = False
) -> Response:
    rid = row["request_id"]
    try:
        resp = await handle()
    except ApiError as err:
        row.update(status="rejected" if err.http_status < 500 else "error", error=err.code)
        resp = api_error_response(err, rid, openai)
    except Exception as err:  # logged here by type only; the client gets a plain JSON 500
        log.error("request %s failed: %s", rid, type(err).__name__)
        row.update(status="error", error="internal_error")
        resp = error_response(500, "internal_error", "internal error", rid, openai=openai)
    if not isinstance(resp, StreamingResponse):
        try:
            await run_in_threadpool(audit.append, finish_row(row, resp.status_code))
        except Exception as err:  # fail closed: an answer that cannot be audited is not given
            log.error("audit write failed for request %s: %s", rid, err)
            return error_response(
                503, "audit_unavailable", "the request could not be audited; no answer is given", rid, openai=openai
            )
    resp.headers["X-Request-ID"] = rid
    return resp
