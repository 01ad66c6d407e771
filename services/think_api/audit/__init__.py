"""The think API's audit log: the typed record of a request (record.py), the hash-chained SQLite log that stores it
(log.py) and `so8t audit verify` (cli.py)."""

from services.think_api.audit.log import (
    DB_NAME,
    GENESIS,
    AuditDamaged,
    AuditLog,
    Verdict,
    all_paths,
    default_path,
    iter_rows,
    now_iso,
    row_hash,
    rows,
    verify,
)
from services.think_api.audit.record import ADDED, FIELDS, NAMES, AuditRecord, Column, RowStatus

__all__ = [
    "ADDED",
    "DB_NAME",
    "FIELDS",
    "GENESIS",
    "NAMES",
    "AuditDamaged",
    "AuditLog",
    "AuditRecord",
    "Column",
    "RowStatus",
    "Verdict",
    "all_paths",
    "default_path",
    "iter_rows",
    "now_iso",
    "row_hash",
    "rows",
    "verify",
]
