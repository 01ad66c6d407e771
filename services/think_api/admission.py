"""Admission control: at most `parallel` generations at once, at most `max_queue` requests waiting for one, the
rest answered 429 (`queue_full`, `Retry-After`) at once; and the client watch that drops a request whose client
has gone, before the backend sees it or as soon as the backend can stop.

Model work never runs on the event loop's shared thread pool: each admitted generation gets a thread of its own
(backends/pump.py), and at most `parallel` of them exist, so `/healthz`, a 401, a 422 and the audit writes (anyio's
pool) never wait behind generations. A slot is given back when the backend's thread has ended (not when the client
went), so `parallel` is what the backend really runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request

from services.think_api.web.errors import ApiError

CANCELLED = "client_disconnected"  # the audit row's error code of a request whose client went away


class ClientGone(ApiError):
    """The client closed its connection before the answer: nobody reads the response; the row says `cancelled`."""

    def __init__(self) -> None:
        super().__init__(499, CANCELLED, "the client closed the connection before the answer")


class ClientWatch:
    """Watches a request whose body has been read: `gone` is set when the client closes its connection (the next
    ASGI message after the body is `http.disconnect`). Stop it before a streaming response takes over `receive`."""

    def __init__(self, request: Request):
        self.gone = asyncio.Event()
        self._receive = request.receive
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return

    def check(self) -> None:
        if self.gone.is_set():
            raise ClientGone()

    async def race(self, aw: asyncio.Future | asyncio.Task) -> None:
        """Wait for `aw` or the client's leaving, whichever comes first (then ClientGone; `aw` is left running)."""
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({aw, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not aw.done():
            raise ClientGone()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class Admission:
    """A bounded number of generations and a bounded, first-come waiting room, on the event loop."""

    def __init__(self, parallel: int, max_queue: int, retry_after_s: int = 1):
        if parallel < 1 or max_queue < 0:
            raise ValueError(f"parallel must be >= 1 and max_queue >= 0 (got {parallel}, {max_queue})")
        self.parallel, self.max_queue, self.retry_after_s = parallel, max_queue, retry_after_s
        self.running = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _full(self) -> ApiError:
        return ApiError(
            429,
            "queue_full",
            f"the server is busy ({self.parallel} generations running, {self.max_queue} waiting); retry later",
            retry_after=self.retry_after_s,
        )

    async def enter(self, watch: ClientWatch) -> None:
        """Take a generation slot, waiting in line when all are taken; 429 when the line is full too, ClientGone
        when the client leaves while waiting (it never reaches the backend)."""
        self._loop = asyncio.get_running_loop()
        watch.check()
        if self.running < self.parallel and not self._waiting:
            self.running += 1
            return
        if len(self._waiting) >= self.max_queue:
            raise self._full()
        turn: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append(turn)
        try:
            await watch.race(turn)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._leave()  # the slot came just as the client went: hand it on
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
            raise

    def _leave(self) -> None:
        """Give a slot back (on the event loop): to the first one still waiting, else to the pool."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on; `running` stays
                return
        self.running -= 1

    def leave_threadsafe(self) -> None:
        """Give a slot back from the backend's thread when it has ended."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._leave)
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits
            pass

    @contextlib.asynccontextmanager
    async def watching(self, request: Request) -> AsyncIterator[ClientWatch]:
        """A ClientWatch on `request` for the duration of the block."""
        watch = ClientWatch(request)
        try:
            yield watch
        finally:
            watch.stop()
