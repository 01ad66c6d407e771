"""What every backend of the think API takes and gives: a rendered prompt in, a reply (whole or streamed) out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenRequest:
    prompt: str  # rendered chat text ending in `<|assistant|>\n`
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # stop | length


# A stream yields the reply's text as it is generated, then one Generation of the whole reply with its counts.
StreamItem = str | Generation


class BackendError(RuntimeError):
    """A generation that failed for a reason the client may see (code, HTTP status, message without model text)."""

    def __init__(self, code: str, http_status: int, message: str):
        super().__init__(message)
        self.code, self.http_status, self.message = code, http_status, message


class Backend(Protocol):
    name: str
    model: str

    def generate(self, req: GenRequest) -> Generation: ...

    def stream(self, req: GenRequest) -> Iterator[StreamItem]: ...

    def health(self) -> tuple[bool, str]: ...

    def close(self) -> None: ...
