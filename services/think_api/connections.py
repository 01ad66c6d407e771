"""Connection limits of the think API's HTTP server (uvicorn's h11 protocol, guarded):

- a request's headers must arrive within `header_timeout_s` of the connection opening (or of its previous response),
  so sockets that connect and say nothing, or dribble their headers, are closed;
- an idle keep-alive connection is closed after `idle_timeout_s` (uvicorn's timeout_keep_alive);
- at most `max_connections` connections: one more evicts the connection idle the longest (one with no request in
  progress), and is itself closed only when every connection is busy. A flood of idle sockets therefore never locks
  out a fresh client; keep `max_connections` below the process's descriptor limit (`ulimit -n`).
Closing is logged once per `LOG_EVERY_S` with a count, never once per socket. A slowly-sent body is bounded by the
routes (`body_timeout_s`, 408).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("think-api")
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    max_connections: int = 512


class _Counter:
    """Closed connections by reason, logged at most once per LOG_EVERY_S."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last = 0.0

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            summary = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
            log.warning("connections closed by the server's limits: %s", summary)
            self.counts, self.last = {}, now


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header deadline and the connection cap of `limits`."""
    closed = _Counter()

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _idle_since = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_since = time.monotonic()
            self._arm()
            if len(self.connections) > limits.max_connections:
                self._make_room()

        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _make_room(self) -> None:
            others = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self]
            idle = [c for c in others if not c._busy()]
            victim = min(idle, key=lambda c: c._idle_since) if idle else self
            closed.add("over the connection cap")
            victim._close()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if not self._busy():
                closed.add("headers not sent in time")
                self._close()

        def _close(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle and self._busy():  # a new request's headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = time.monotonic()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def server_config(app: Any, host: str, port: int, limits: ConnectionLimits, **kw: Any) -> Any:
    """The uvicorn Config of the think API with `limits` applied."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type]  # a float works (call_later)
        **kw,
    )
