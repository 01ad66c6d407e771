"""The audit record: what one row of the audit log holds, one field per column (the column's SQL type on the field).

A new column is one field here: the table gains it on open, and `Column(added=True)` keeps rows written before it
verifying as they did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

RowStatus = Literal["answered", "denied", "refused", "escalated", "withheld", "rejected", "error", "cancelled"]


@dataclass(frozen=True)
class Column:
    """A field's column: its SQL type; `added`: missing from databases written before it (added on open, hashed only
    when set, so older rows verify as they did)."""

    sql: str
    added: bool = False


class AuditRecord(BaseModel):
    """One audit row, one field per column, in chain order (seq, prev_hash and row_hash are added around them).

    Created once per request (replies.new_record) and filled along its path: the request's size, the backend's
    figures, the gate's decision, the HTTP status; AuditLog.append writes it. Hashes, lengths, codes and numbers,
    never texts. A field that does not exist is a type error (mypy) and, at run time, a ValueError."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ts: Annotated[str | None, Column("TEXT NOT NULL")] = None  # UTC, ISO 8601 with milliseconds; set on write
    request_id: Annotated[str, Column("TEXT NOT NULL")]
    model: Annotated[str, Column("TEXT NOT NULL")]
    backend: Annotated[str, Column("TEXT NOT NULL")]
    status: Annotated[RowStatus | None, Column("TEXT NOT NULL")] = None
    http_status: Annotated[int | None, Column("INTEGER NOT NULL")] = None
    error: Annotated[str | None, Column("TEXT")] = None  # an error code or the parser's fixed reason, never model text
    label: Annotated[str | None, Column("TEXT")] = None
    escalated: Annotated[bool, Column("INTEGER NOT NULL")] = False
    # the digests are HMAC-SHA256 under the server secret (the columns keep their first names)
    thinking_sha256: Annotated[str | None, Column("TEXT")] = None
    answer_sha256: Annotated[str | None, Column("TEXT")] = None
    output_sha256: Annotated[str | None, Column("TEXT")] = None  # the raw model reply
    prompt_chars: Annotated[int | None, Column("INTEGER")] = None
    thinking_chars: Annotated[int | None, Column("INTEGER")] = None
    answer_chars: Annotated[int | None, Column("INTEGER")] = None
    output_chars: Annotated[int | None, Column("INTEGER")] = None
    prompt_tokens: Annotated[int | None, Column("INTEGER")] = None
    completion_tokens: Annotated[int | None, Column("INTEGER")] = None
    latency_ms: Annotated[float | None, Column("REAL NOT NULL")] = None
    backend_ms: Annotated[float | None, Column("REAL")] = None
    endpoint: Annotated[str | None, Column("TEXT", added=True)] = None  # /think | /v1/chat/completions
    stream: Annotated[bool | None, Column("INTEGER", added=True)] = None  # the answer went out as server-sent events
    # a tally row: how many requests of one endpoint, status and code were refused in its minute (AuditLog.tally)
    count: Annotated[int | None, Column("INTEGER", added=True)] = None

    _started: float = PrivateAttr(default_factory=time.perf_counter)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        unknown = set(data) - set(cls.model_fields) if isinstance(data, dict) else set()
        if unknown:
            raise ValueError(f"unknown audit fields: {sorted(unknown)}")
        return data

    def elapsed_ms(self) -> float:
        """Milliseconds since the record was created (the request's arrival)."""
        return (time.perf_counter() - self._started) * 1000

    def finish(self, http_status: int) -> AuditRecord:
        """The HTTP status and the latency so far: the last fields before the row is written."""
        self.http_status, self.latency_ms = http_status, self.elapsed_ms()
        return self


def _column(name: str) -> Column:
    return next(m for m in AuditRecord.model_fields[name].metadata if isinstance(m, Column))


# (column, SQL type) of the hashed record, in chain order: one source, the record's fields.
FIELDS: tuple[tuple[str, str], ...] = tuple((name, _column(name).sql) for name in AuditRecord.model_fields)
NAMES = tuple(name for name, _ in FIELDS)
ADDED = frozenset(name for name in NAMES if _column(name).added)
