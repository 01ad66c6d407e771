"""A backend's stream, run in a thread of its own and read from the event loop.

The backends are blocking iterators (llama.cpp's token loop, Ollama's streamed HTTP body); the SSE response awaits
their items here with a timeout (for keep-alives) and stops them when the client goes or a check fails: the thread
closes the iterator itself, so llama.cpp stops generating and releases its lock. Items wait in a deque; the thread
wakes the event loop once per batch, not once per token, so a fast backend is not slowed by the reader.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio

from services.think_api.backends.protocol import Backend, BackendError, Generation, GenRequest

END = object()  # the backend's iterator is exhausted (or closed)
SILENCE = object()  # nothing arrived within the timeout
GONE = object()  # the client went away (the `gone` event given to `get` is set)


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = {asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class BackendPump:
    """`on_end` is called on the backend's thread once it has ended (the admission slot is given back then)."""

    def __init__(self, backend: Backend, req: GenRequest, on_end: Callable[[], None] | None = None):
        self._loop = asyncio.get_running_loop()
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self._stop = threading.Event()
        self._on_end = on_end
        self._thread = threading.Thread(target=self._run, args=(backend, req), name="so8t-model", daemon=True)
        self._thread.start()

    def _wake(self) -> None:  # on the event loop
        self._wake_pending = False
        self._ready.set()

    def _put(self, item: Any) -> None:  # on the backend's thread
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is reading
                self._stop.set()

    def _run(self, backend: Backend, req: GenRequest) -> None:
        items: Iterator[Any] | None = None
        try:
            if self._stop.is_set():  # stopped before it began: the backend never sees the request
                return
            items = backend.stream(req)
            for item in items:
                if self._stop.is_set():
                    break
                self._put(item)
        except BaseException as err:  # noqa: BLE001 - handed to the reader, which reports it
            self._put(err)
        finally:
            try:
                getattr(items, "close", lambda: None)()
            except Exception:  # noqa: BLE001 - a backend that fails to close has ended all the same
                pass
            self._put(END)
            if self._on_end is not None:
                self._on_end()

    async def get(self, timeout: float, gone: asyncio.Event | None = None) -> Any:
        """The next item (text, Generation, an exception, END), SILENCE after `timeout` seconds, or GONE once
        `gone` is set (the backend is then told to stop)."""
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            if gone is not None and gone.is_set():
                self.stop()
                return GONE
            with anyio.move_on_after(max(timeout, 0.0)) as waited:
                await (self._ready.wait() if gone is None else _either(self._ready, gone))
            if waited.cancelled_caught:
                return SILENCE
        return self._items.popleft()

    async def whole(self, gone: asyncio.Event) -> Generation | None:
        """The whole reply (the stream's last item), None if the client went first (the backend is stopped)."""
        while True:
            item = await self.get(float("inf"), gone)
            if isinstance(item, Generation):
                return item
            if item is GONE:
                return None
            if isinstance(item, BaseException):
                raise item
            if item is END:
                raise BackendError("backend_bad_response", 502, "the backend's stream ended before its last part")

    def more_text(self) -> str:
        """The text items already waiting right behind the one just read (joined), without waiting."""
        parts = []
        while self._items and isinstance(self._items[0], str):
            parts.append(self._items.popleft())
        return "".join(parts)

    def stop(self) -> None:
        """Stop at the backend's next item; returns at once."""
        self._stop.set()
