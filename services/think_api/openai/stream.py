"""`stream: true`: the answer as server-sent events in the OpenAI chunk shape, the thinking never.

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": "..."}}]}
    data: ... (more content)
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}], "so8t": {label, status, ...}}
    data: {... "choices": [], "usage": {...}}                      (with stream_options.include_usage)
    data: [DONE]

Nothing is sent while the model thinks (only `: keep-alive` comments, after each silence of
stream_keepalive_s). The reply goes through gate.StreamGate, the label gate of /think applied as it is
generated, so what streams adds up to /think's answer. A reply that fails a check ends with one error event
(`{"error": {"code": "withheld", ...}, "so8t": {...}}`) and `data: [DONE]`, never with the offending text;
REFUSE and ESCALATION send their fixed texts at the end. The audit row is written before the last held-back part
and the finish event: a stream whose row cannot be written ends with an error instead. A client that goes away
stops the generation and leaves a row with status `cancelled`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Send

from services.think_api import gate
from services.think_api.admission import ClientGone
from services.think_api.audit import AuditLog, AuditRecord
from services.think_api.backends.protocol import Backend, BackendError, Generation, GenRequest
from services.think_api.backends.pump import END, GONE, SILENCE, BackendPump
from services.think_api.openai.models import (
    ChatCompletionChunk,
    ChatError,
    ChatErrorBody,
    ChunkChoice,
    Delta,
    FinishReason,
)
from services.think_api.openai.shapes import finish_reason, so8t_info, usage
from services.think_api.replies import (
    admission_of,
    backend_api_error,
    record_decision,
    record_sent,
    record_usage,
    start_generation,
)
from services.think_api.settings import ServeSettings
from services.think_api.web.errors import ApiError, openai_type
from shared import logs

log = logs.get("think-api")
KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


def sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """A StreamingResponse that closes its events and then calls `on_close`, however the response ended (the client
    may go away before the first event, when the events' own cleanup has not even started)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kw: Any):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.on_close()


class Chunks:
    """The events of one stream, in the OpenAI chunk shape; the role goes with the first content."""

    def __init__(self, request_id: str, model: str):
        self.request_id, self.model = request_id, model
        self.id, self.created = f"chatcmpl-{request_id}", int(time.time())
        self._role_sent = False

    def _chunk(self, choices: list[ChunkChoice], **extra: Any) -> str:
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extra))

    def content(self, text: str) -> str:
        delta = Delta(role=None if self._role_sent else "assistant", content=text)
        self._role_sent = True
        return self._chunk([ChunkChoice(delta=delta)])

    def finish(self, reason: FinishReason, d: gate.Decision) -> str:
        return self._chunk([ChunkChoice(delta=Delta(), finish_reason=reason)], so8t=so8t_info(d, self.request_id))

    def usage(self, gen: Generation) -> str:
        return self._chunk([], usage=usage(gen))

    def error(self, http_status: int, code: str, message: str, d: gate.Decision | None = None) -> str:
        err = ChatError(message=message, type=openai_type(http_status), param=None, code=code)
        info = so8t_info(d, self.request_id) if d is not None else None
        return sse(ChatErrorBody(error=err, request_id=self.request_id, so8t=info))


class _Stream:
    """One stream's state: the gate, the events, the audit row (written once)."""

    def __init__(
        self, pump: BackendPump, audit: AuditLog, row: AuditRecord, gate_prompt: str, model: str, include_usage: bool
    ):
        self.pump, self.audit, self.row, self.include_usage = pump, audit, row, include_usage
        self.gate = gate.StreamGate(gate_prompt, audit.secret)
        self.chunks = Chunks(row.request_id, model)
        self.audited = False

    async def close(self) -> None:
        """The stream is over: a row not written yet means the client went away before the end."""
        self.pump.stop()
        if not self.audited:
            self.row.status, self.row.error = "cancelled", "client_disconnected"
            await self.write_row()

    async def write_row(self) -> bool:
        """Write the row (once), with the gate's figures of what was generated and sent. False if the audit log
        failed."""
        self.audited = True
        if self.row.backend_ms is None:
            self.row.backend_ms = self.row.elapsed_ms()
        record_sent(self.row, self.gate.reply, self.gate.sent, self.audit.secret)
        try:
            with anyio.CancelScope(shield=True):  # also when the client has gone and this task is cancelled
                await run_in_threadpool(self.audit.append, self.row.finish(200))
            return True
        except Exception as err:
            log.error("audit write failed for request %s: %s", self.row.request_id, err)
            return False

    def record(self, d: gate.Decision, gen: Generation | None) -> None:
        """The decision on the reply and the backend's counts, into the row."""
        record_decision(self.row, d, self.gate.reply, self.gate.sent, self.audit.secret)
        if gen is not None:
            record_usage(self.row, gen)

    async def answered(self, gen: Generation) -> AsyncIterator[str]:
        rest, d = self.gate.finish()
        if d.status == "withheld":
            async for event in self.withheld(d, gen):
                yield event
            return
        self.record(d, gen)
        if not await self.write_row():
            yield self.chunks.error(503, "audit_unavailable", "the request could not be audited; no more is sent")
            return
        if rest:
            yield self.chunks.content(rest)
        yield self.chunks.finish(finish_reason(gen), d)
        if self.include_usage:
            yield self.chunks.usage(gen)

    async def withheld(self, d: gate.Decision, gen: Generation | None = None) -> AsyncIterator[str]:
        self.record(d, gen)
        await self.write_row()
        yield self.chunks.error(502, "withheld", gate.WITHHELD, d)

    async def failed(self, item: Any) -> AsyncIterator[str]:
        """The backend failed after the stream began (or its stream ended without its last part)."""
        if isinstance(item, BackendError):
            status, code, message = item.http_status, item.code, item.message
        elif item is END:
            status, code, message = 502, "backend_bad_response", "the backend's stream ended before its last part"
        else:
            log.error("request %s: stream failed: %s", self.row.request_id, type(item).__name__)
            status, code, message = 500, "internal_error", "internal error"
        self.row.status, self.row.error = "error", code
        await self.write_row()
        yield self.chunks.error(status, code, message)


async def _events(pump: BackendPump, first: Any, st: _Stream, keepalive_s: float) -> AsyncIterator[str]:
    try:
        item, last_sent = first, time.monotonic()
        while True:
            if isinstance(item, str):
                text = st.gate.feed(item + pump.more_text())  # one check for what arrived meanwhile
                if st.gate.failure is not None:
                    break
                if text:
                    yield st.chunks.content(text)
                    last_sent = time.monotonic()
            elif item is not SILENCE:
                break
            if time.monotonic() - last_sent >= keepalive_s:  # the client has heard nothing for a while
                yield KEEPALIVE
                last_sent = time.monotonic()
            item = await pump.get(last_sent + keepalive_s - time.monotonic())
        pump.stop()
        st.row.backend_ms = st.row.elapsed_ms()
        if st.gate.failure is not None:
            ending = st.withheld(st.gate.failure)
        elif isinstance(item, Generation):
            ending = st.answered(item)
        else:
            ending = st.failed(item)
        async for event in ending:
            yield event
        yield DONE
    finally:
        await st.close()


async def open_stream(
    request: Request,
    backend: Backend,
    audit: AuditLog,
    s: ServeSettings,
    req: GenRequest,
    gate_prompt: str,
    row: AuditRecord,
    include_usage: bool,
) -> Response:
    """Admit the request and start the backend; an error before its first token is a plain HTTP error, after it
    an error event. A client that leaves before the first token stops the backend (or never reaches it)."""
    try:
        await run_in_threadpool(audit.check)
    except Exception as err:
        log.error("audit log not writable for request %s: %s", row.request_id, err)
        raise ApiError(503, "audit_unavailable", "the request could not be audited; no answer is given") from None
    async with admission_of(request).watching(request) as watch:
        pump, _ = await start_generation(request, backend, req, watch)
        first = await pump.get(s.stream_keepalive_s, watch.gone)
    if first is GONE:
        row.backend_ms = row.elapsed_ms()
        raise ClientGone()
    if isinstance(first, BaseException):
        pump.stop()
        row.backend_ms = row.elapsed_ms()
        if isinstance(first, BackendError):
            raise backend_api_error(first)
        raise first
    st = _Stream(pump, audit, row, gate_prompt, backend.model, include_usage)
    return EventStream(
        _events(pump, first, st, s.stream_keepalive_s),
        on_close=st.close,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
