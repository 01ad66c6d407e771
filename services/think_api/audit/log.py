"""The audit log: one SQLite (WAL) row per model request (/think and /v1/chat/completions, streamed or not),
hash-chained, holding hashes and numbers, never texts.

Each row stores `prev_hash` (the previous row's `row_hash`, 64 zeros for the first) and
`row_hash = HMAC-SHA256(secret, prev_hash + "\\n" + canonical JSON of the row's other columns)`, keyed with the
server secret (secret.py), so a row edited, deleted or inserted cannot be re-chained by anyone without the secret;
columns added after the first release (ADDED) enter the JSON only when set. Dropping the newest rows is caught
against the head anchor (anchor.py), kept outside the database's directory. Appends take SQLite's write lock
(BEGIN IMMEDIATE), so several processes may share one file. The directory is 0700 and the files 0600: only the
think API (its own volume in the stack) can read or write them.

Requests refused before they are authenticated or parsed (401, 400, 413, 415, a foreign Host) are not a row each:
`tally` counts them per minute, endpoint and code, and one row per such group (`count`) is written when the minute
is over (at the next append or tally) and at shutdown, so a flood of them costs no fsync each.

A server opening the log checks it first (SQLite's quick_check of every page, and the newest row against its hash,
which the next row links to): a damaged database is refused with an error naming it, never appended to; the whole
chain is `so8t audit verify`'s to walk.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.think_api.audit import anchor as anchors
from services.think_api.audit.record import ADDED, FIELDS, NAMES, AuditRecord
from services.think_api.secret import ServerSecret
from shared.errors import InputError
from shared.layout import Layout

DB_NAME = "think_audit.sqlite3"
GENESIS = "0" * 64
REPLICA_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def default_path(replica: str | None = None) -> Path:
    """$DATA_DIR/audit/think_audit.sqlite3, or think_audit-<replica>.sqlite3: each replica of the API behind one
    load balancer keeps its own chain in its own file."""
    if replica is None:
        return Layout.from_env().audit_dir / DB_NAME
    if not REPLICA_RE.fullmatch(replica):
        raise InputError(f"replica name {replica!r}: letters, digits, '.', '_' and '-' only, at most 64")
    return Layout.from_env().audit_dir / f"{Path(DB_NAME).stem}-{replica}.sqlite3"


def all_paths(audit_dir: Path | None = None) -> list[Path]:
    """Every replica's audit database in `audit_dir` (default $DATA_DIR/audit)."""
    folder = audit_dir or Layout.from_env().audit_dir
    return sorted(folder.glob(f"{Path(DB_NAME).stem}*.sqlite3"))


def row_hash(secret: ServerSecret, prev_hash: str, record: dict[str, Any]) -> str:
    hashed = {k: record.get(k) for k in NAMES if k not in ADDED or record.get(k) is not None}
    body = json.dumps(hashed, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return secret.mac(f"{prev_hash}\n{body}".encode())


def _coerce(value: Any, sql: str) -> Any:
    """The Python value SQLite gives back for this column, so the hash of a row read back is the hash written."""
    if value is None:
        return None
    if sql.startswith("INTEGER"):
        return int(value)
    if sql.startswith("REAL"):
        return round(float(value), 3)
    return str(value)


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    head: str
    broken_seq: int | None = None
    reason: str | None = None
    keyed: bool = True  # False: checked without the secret (links and order only; a re-chained log passes)
    anchored: bool = False  # the head anchor was checked


class AuditDamaged(InputError):
    """The audit database is damaged (unreadable pages, or a newest row that does not match its hash)."""

    def __init__(self, path: Path, why: str):
        super().__init__(
            f"{path}: the audit log is damaged ({why}); it is not appended to. Run `so8t audit verify --db {path}` "
            "to find the first broken row, keep the file as evidence and start the server on a new one"
        )


def _private(path: Path) -> None:
    """The directory 0700 and the database 0600 (SQLite gives its -wal and -shm files the database's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.parent.stat().st_uid == os.getuid():
        os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    if path.stat().st_uid == os.getuid():
        os.chmod(path, 0o600)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class AuditLog:
    """Append-only audit rows in `path` (created 0600 with its 0700 directory when missing), chained under `secret`
    (None: an ephemeral key, for tests and benchmarks), the head anchored to `anchor` (outside the directory)."""

    def __init__(
        self,
        path: str | Path | None = None,
        secret: ServerSecret | None = None,
        anchor: Path | None = None,
        anchor_every: int = 1,
        anchor_interval_s: float = 10.0,
    ):
        self.path = Path(path) if path else default_path()
        self.secret = secret or ServerSecret.ephemeral()
        if anchor is not None:
            anchors.check_outside(anchor, self.path)
        self.anchor = anchors.AnchorWriter(anchor, self.secret, anchor_every, anchor_interval_s)
        self._tally: Counter[tuple[str, ...]] = Counter()
        self._minute = _minute()
        _private(self.path)
        self._lock = threading.Lock()
        self._conn = _connect(self.path)
        try:
            self._open()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise AuditDamaged(self.path, f"SQLite: {err}") from None
        except AuditDamaged:
            self._conn.close()
            raise

    def _open(self) -> None:
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")  # an acknowledged request stays logged after power loss
        check = [r[0] for r in self._conn.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise AuditDamaged(self.path, f"SQLite quick_check: {'; '.join(map(str, check[:3]))}")
        cols = ", ".join(f"{n} {t}" for n, t in FIELDS)
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, {cols}, "
            "prev_hash TEXT NOT NULL, row_hash TEXT NOT NULL)"
        )
        present = {r[1] for r in self._conn.execute("PRAGMA table_info(audit)")}
        for name, sql in FIELDS:
            if name not in present:
                self._conn.execute(f"ALTER TABLE audit ADD COLUMN {name} {sql}")
        self._check_head()

    def _check_head(self) -> None:
        """The newest row (the one the next row links to) must match its own hash."""
        cur = self._conn.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT 1")
        names = [d[0] for d in cur.description]
        last = cur.fetchone()
        if last is None:
            return
        r = dict(zip(names, last))
        if not isinstance(r.get("prev_hash"), str) or row_hash(self.secret, r["prev_hash"], r) != r.get("row_hash"):
            raise AuditDamaged(
                self.path,
                f"the newest row, seq={r.get('seq')}, does not match its row_hash under this server secret "
                "(edited, or written with another secret or before the chain was keyed)",
            )

    def check(self) -> None:
        """Raise unless a row could be written now (the write lock is taken and given back)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("ROLLBACK")

    def append(self, record: AuditRecord) -> dict[str, Any]:
        """Write one row (fields not set are NULL); returns it with seq, prev_hash and row_hash."""
        if not isinstance(record, AuditRecord):
            raise TypeError(f"the audit log takes an AuditRecord, not {type(record).__name__}")
        self._flush_tally(closing=False)
        return self._append(record)

    def tally(self, record: AuditRecord) -> None:
        """Count a request refused before it was authenticated or parsed (no row of its own; see the docstring)."""
        key = (record.endpoint or "", record.status or "rejected", record.error or "", str(record.http_status or 0))
        with self._lock:
            self._tally[(record.model, record.backend, *key)] += 1
        self._flush_tally(closing=False)

    def _flush_tally(self, closing: bool) -> None:
        """One row per counted group, once its minute is over (or now, at shutdown)."""
        minute = _minute()
        with self._lock:
            if not self._tally or (minute == self._minute and not closing):
                self._minute = minute
                return
            groups, self._tally, was, self._minute = self._tally, Counter(), self._minute, minute
        for (model, backend, endpoint, status, error, http), n in sorted(groups.items()):
            self._append(
                AuditRecord(
                    request_id=f"tally-{was}",
                    model=model,
                    backend=backend,
                    endpoint=endpoint or None,
                    status=status,
                    error=error or None,
                    http_status=int(http),
                    latency_ms=0.0,
                    count=n,
                )
            )

    def _append(self, record: AuditRecord) -> dict[str, Any]:
        rec = {name: _coerce(getattr(record, name), sql) for name, sql in FIELDS}
        if rec["ts"] is None:
            rec["ts"] = now_iso()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                last = self._conn.execute("SELECT seq, row_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                h = row_hash(self.secret, prev, rec)
                self._conn.execute(
                    f"INSERT INTO audit (seq, {', '.join(NAMES)}, prev_hash, row_hash) "
                    f"VALUES (?, {', '.join('?' * len(NAMES))}, ?, ?)",
                    (seq, *(rec[k] for k in NAMES), prev, h),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self.anchor.appended(seq, h, rec["ts"])
        return {"seq": seq, **rec, "prev_hash": prev, "row_hash": h}

    def flush(self) -> None:
        """Write what was tallied and the head anchor now (the server's shutdown; uvicorn re-raises SIGTERM after
        it, so code after the server returns may never run)."""
        self._flush_tally(closing=True)
        with self._lock:
            self.anchor.write()

    def close(self) -> None:
        """flush(), then close."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._conn.close()


def _minute() -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())


def rows(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_rows(path))


def iter_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows in chain order, one at a time (constant memory)."""
    conn = _connect(Path(path))
    try:
        conn.row_factory = sqlite3.Row
        for r in conn.execute("SELECT * FROM audit ORDER BY seq"):
            yield dict(r)
    finally:
        conn.close()


def verify(path: str | Path, secret: ServerSecret | None = None, anchor: Path | None = None) -> Verdict:
    """Walk the chain from the first row, one row at a time; the Verdict names the first broken row and why. Without
    `secret` only order and links are checked (`keyed` False); with `anchor`, the anchored row must be there as
    anchored (a truncated or re-chained log fails)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audit database not found")
    head = anchors.read(anchor) if anchor is not None else None
    if head is not None and secret is not None and not head.genuine(secret):
        return Verdict(False, 0, GENESIS, head.seq, f"{anchor}: the anchor's MAC does not match this secret")
    prev, n, anchored = GENESIS, 0, False
    for r in iter_rows(path):
        seq, n = r["seq"], n + 1
        why = _broken(r, n, prev, secret)
        if why is not None:
            return Verdict(False, n, prev, seq, why, secret is not None, head is not None)
        if head is not None and seq == head.seq:
            if r["row_hash"] != head.row_hash:
                why = f"row seq={seq} is not the row the anchor names (re-chained or replaced)"
                return Verdict(False, n, prev, seq, why, secret is not None, True)
            anchored = True
        prev = r["row_hash"]
    if head is not None and not anchored:
        why = f"the log ends at seq {n} but the anchor names seq {head.seq}: rows were dropped (truncated)"
        return Verdict(False, n, prev, n + 1, why, secret is not None, True)
    return Verdict(True, n, prev, keyed=secret is not None, anchored=head is not None)


def _broken(r: dict[str, Any], expected: int, prev: str, secret: ServerSecret | None) -> str | None:
    """Why row `r` (the `expected`-th) breaks the chain, or None."""
    if r["seq"] != expected:
        return f"rows missing before seq {r['seq']} (expected seq {expected})"
    if r["prev_hash"] != prev:
        return "prev_hash does not match the previous row's hash"
    if secret is not None and row_hash(secret, prev, r) != r["row_hash"]:
        return "row content does not match its row_hash under this secret (edited or re-chained)"
    return None
