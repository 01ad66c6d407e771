"""The audit log: one SQLite (WAL) row per model request (/think and /v1/chat/completions, streamed or not),
hash-chained, holding hashes and numbers, never texts.

Each row stores `prev_hash` (the previous row's `row_hash`, 64 zeros for the first) and
`row_hash = SHA-256(prev_hash + "\\n" + canonical JSON of the row's other columns)`; columns added after the
first release (ADDED) enter the JSON only when set, so rows written before them verify as they did. Editing,
inserting or deleting a row breaks the chain at that row (deleting the newest rows is only visible against a head
hash kept elsewhere: `so8t audit verify` prints it). Appends take SQLite's write lock (BEGIN IMMEDIATE), so several
processes may share one file.

A server opening the log checks it first (SQLite's quick_check of every page, and the newest row against its hash,
which the next row links to): a damaged database is refused with an error naming it, never appended to; the whole
chain is `so8t audit verify`'s to walk.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.think_api.audit.record import ADDED, FIELDS, NAMES, AuditRecord
from shared.errors import InputError
from shared.layout import Layout

DB_NAME = "think_audit.sqlite3"
GENESIS = "0" * 64


def default_path() -> Path:
    return Layout.from_env().audit_dir / DB_NAME


def row_hash(prev_hash: str, record: dict[str, Any]) -> str:
    hashed = {k: record.get(k) for k in NAMES if k not in ADDED or record.get(k) is not None}
    body = json.dumps(hashed, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


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


class AuditDamaged(InputError):
    """The audit database is damaged (unreadable pages, or a newest row that does not match its hash)."""

    def __init__(self, path: Path, why: str):
        super().__init__(
            f"{path}: the audit log is damaged ({why}); it is not appended to. Run `so8t audit verify --db {path}` "
            "to find the first broken row, keep the file as evidence and start the server on a new one"
        )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class AuditLog:
    """Append-only, hash-chained audit rows in `path` (created with its directory when missing)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        if not isinstance(r.get("prev_hash"), str) or row_hash(r["prev_hash"], r) != r.get("row_hash"):
            raise AuditDamaged(self.path, f"the newest row, seq={r.get('seq')}, does not match its row_hash")

    def check(self) -> None:
        """Raise unless a row could be written now (the write lock is taken and given back)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("ROLLBACK")

    def append(self, record: AuditRecord) -> dict[str, Any]:
        """Write one row (fields not set are NULL); returns it with seq, prev_hash and row_hash."""
        if not isinstance(record, AuditRecord):
            raise TypeError(f"the audit log takes an AuditRecord, not {type(record).__name__}")
        rec = {name: _coerce(getattr(record, name), sql) for name, sql in FIELDS}
        if rec["ts"] is None:
            rec["ts"] = now_iso()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                last = self._conn.execute("SELECT seq, row_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                h = row_hash(prev, rec)
                self._conn.execute(
                    f"INSERT INTO audit (seq, {', '.join(NAMES)}, prev_hash, row_hash) "
                    f"VALUES (?, {', '.join('?' * len(NAMES))}, ?, ?)",
                    (seq, *(rec[k] for k in NAMES), prev, h),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return {"seq": seq, **rec, "prev_hash": prev, "row_hash": h}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def rows(path: str | Path) -> list[dict[str, Any]]:
    conn = _connect(Path(path))
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        conn.close()


def verify(path: str | Path) -> Verdict:
    """Walk the chain from the first row; the Verdict names the first broken row and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audit database not found")
    prev, expected = GENESIS, 1
    all_rows = rows(path)
    for r in all_rows:
        seq = r["seq"]
        if seq != expected:
            return Verdict(False, len(all_rows), prev, seq, f"rows missing before seq {seq} (expected seq {expected})")
        if r["prev_hash"] != prev:
            return Verdict(False, len(all_rows), prev, seq, "prev_hash does not match the previous row's hash")
        if row_hash(prev, r) != r["row_hash"]:
            return Verdict(False, len(all_rows), prev, seq, "row content does not match its row_hash (edited)")
        prev, expected = r["row_hash"], seq + 1
    return Verdict(True, len(all_rows), prev)
