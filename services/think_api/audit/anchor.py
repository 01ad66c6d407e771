"""The audit chain's head anchor: the newest row's seq and row_hash, MACed with the server secret, written outside
the database's directory (`so8t serve --audit-anchor PATH`) and printed to stdout, every N rows or T seconds and at
shutdown. A log whose newest rows were dropped, or that was re-chained from some row on, no longer holds the row the
anchor names: `so8t audit verify --anchor PATH` fails.

    {"seq": 41, "row_hash": "…", "ts": "2026-12-07T15:00:00.000Z", "mac": "HMAC(secret, 'anchor\\n41\\n…')"}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from services.think_api.secret import ServerSecret
from shared import atomic
from shared.errors import InputError


@dataclass(frozen=True)
class Anchor:
    seq: int
    row_hash: str
    ts: str
    mac: str

    @classmethod
    def of(cls, seq: int, row_hash: str, ts: str, secret: ServerSecret) -> Anchor:
        return cls(seq, row_hash, ts, secret.mac(_signed(seq, row_hash)))

    def genuine(self, secret: ServerSecret) -> bool:
        import hmac

        return hmac.compare_digest(self.mac, secret.mac(_signed(self.seq, self.row_hash)))

    def line(self) -> str:
        return json.dumps({"seq": self.seq, "row_hash": self.row_hash, "ts": self.ts, "mac": self.mac})


def _signed(seq: int, row_hash: str) -> bytes:
    return f"anchor\n{seq}\n{row_hash}".encode()


def check_outside(anchor: Path, db: Path) -> None:
    """An anchor beside the database would be lost (or rewritten) with it: refuse one in the db's directory."""
    if anchor.resolve().parent == db.resolve().parent or anchor.resolve().is_relative_to(db.resolve().parent):
        raise InputError(
            f"{anchor}: the audit anchor must live outside the audit database's directory ({db.parent}); "
            "put it on another volume, e.g. /run/so8t/audit.anchor"
        )


def read(path: Path) -> Anchor:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return Anchor(int(d["seq"]), str(d["row_hash"]), str(d["ts"]), str(d["mac"]))
    except FileNotFoundError:
        raise InputError(f"{path}: audit anchor not found") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not an audit anchor ({type(err).__name__}: {err})") from None


class AnchorWriter:
    """Writes the head to `path` (atomically) every `every` rows or `interval_s` seconds (checked at each append), and
    at shutdown; prints it to stdout at most every `interval_s` seconds and at shutdown."""

    def __init__(self, path: Path | None, secret: ServerSecret, every: int = 1, interval_s: float = 10.0):
        self.path, self.secret, self.every, self.interval_s = path, secret, every, interval_s
        if path is not None:  # at start, so a missing folder is an error now, not after a row was written
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._pending, self._written, self._printed = 0, time.monotonic(), 0.0
        self._head: tuple[int, str, str] | None = None

    def appended(self, seq: int, row_hash: str, ts: str) -> None:
        self._head = (seq, row_hash, ts)
        self._pending += 1
        if self._pending >= self.every or time.monotonic() - self._written >= self.interval_s:
            self.write(final=False)

    def write(self, final: bool = True) -> Anchor | None:
        """The head anchored now (None when no row was appended since the last anchor)."""
        if self._head is None or self._pending == 0:
            return None
        seq, row_hash, ts = self._head
        a = Anchor.of(seq, row_hash, ts, self.secret)
        if self.path is not None:
            atomic.write_text(self.path, a.line() + "\n")
        now = time.monotonic()
        if final or now - self._printed >= self.interval_s:
            print(f"so8t audit anchor {a.line()}", flush=True)
            self._printed = now
        self._pending, self._written = 0, now
        return a
