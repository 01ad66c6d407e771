"""NOT A MODEL: a backend that returns preset replies, for testing the gate and for the API-overhead benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from services.think_api.backends.protocol import Generation, GenRequest, StreamItem


class FixedOutputBackend:
    """Returns preset replies. `reply` is a string or a function of the rendered prompt; `delay_s` simulates the
    generation time of a whole reply (a stream waits it before its first piece, like a prompt being read); a stream
    yields `piece_chars` characters at a time, `piece_delay_s` apart. `parallel`: generations it runs at once."""

    name = "fixed-output"

    def __init__(
        self,
        reply: str | Callable[[str], str],
        model: str = "fixed-output",
        delay_s: float = 0.0,
        piece_chars: int = 4,
        piece_delay_s: float = 0.0,
        parallel: int = 64,
    ):
        self.model, self.parallel = model, parallel
        self._reply = reply
        self.delay_s = delay_s
        self.piece_chars, self.piece_delay_s = piece_chars, piece_delay_s
        self.calls: list[GenRequest] = []

    def _text(self, req: GenRequest) -> str:
        self.calls.append(req)
        return self._reply(req.prompt) if callable(self._reply) else self._reply

    def generate(self, req: GenRequest) -> Generation:
        text = self._text(req)
        if self.delay_s:
            time.sleep(self.delay_s)
        return Generation(text, None, None, "stop")

    def stream(self, req: GenRequest) -> Iterator[StreamItem]:
        text = self._text(req)
        if self.delay_s:
            time.sleep(self.delay_s)
        for i in range(0, len(text), self.piece_chars):
            if self.piece_delay_s:
                time.sleep(self.piece_delay_s)
            yield text[i : i + self.piece_chars]
        yield Generation(text, None, None, "stop")

    def health(self) -> tuple[bool, str]:
        return True, "fixed output (test backend, not a model)"

    def close(self) -> None:
        pass
