"""The think API's audit log: `verify` walks the hash chain and reports the first broken row."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser(
        "verify",
        help="check every row's hash and link; exit 1 at the first broken row",
        description="Walk the audit log's hash chain; report the first broken row.",
    )
    v.add_argument("--db", type=Path, default=None, help="audit database (default $DATA_DIR/audit/think_audit.sqlite3)")


def run(args: argparse.Namespace) -> int:
    import sqlite3

    from services.think_api import audit

    path = args.db or audit.default_path()
    try:
        verdict = audit.verify(path)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path}: not a readable audit database ({err})") from None
    if not verdict.ok:
        print(
            f"{path}: BROKEN at row seq={verdict.broken_seq}: {verdict.reason} "
            f"({verdict.rows} rows; chain intact up to seq={(verdict.broken_seq or 1) - 1})"
        )
        return 1
    print(f"{path}: OK, {verdict.rows} rows, chain intact; head hash {verdict.head}")
    return 0
