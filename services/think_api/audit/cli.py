"""The think API's audit log: `verify` walks the keyed hash chain, one row at a time, and checks the head anchor."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import InputError

if TYPE_CHECKING:
    from services.think_api.secret import ServerSecret


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser(
        "verify",
        help="check every row's keyed hash and link, and the head anchor; exit 1 at the first broken row",
        description="Walk the audit log's hash chain under the server secret; report the first broken row; with "
        "--anchor, fail when the anchored row is gone or different (a truncated or re-chained log).",
    )
    v.add_argument(
        "--db",
        type=Path,
        default=None,
        help="audit database (default: every replica's, $DATA_DIR/audit/think_audit*.sqlite3)",
    )
    v.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        help="the server secret the log was written with (default $SO8T_SECRET_FILE, ~/.config/so8t/server.secret)",
    )
    v.add_argument("--anchor", type=Path, default=None, help="the head anchor `so8t serve --audit-anchor` wrote")


def run(args: argparse.Namespace) -> int:
    from services.think_api import audit
    from services.think_api.secret import ServerSecret, default_path

    paths = [args.db] if args.db else audit.all_paths() or [audit.default_path()]
    if len(paths) > 1 and args.anchor is not None:
        raise InputError(f"--anchor belongs to one chain: give --db too ({len(paths)} replicas' logs found)")
    secret = ServerSecret.load(args.secret_file or default_path(), create=False)
    broken = sum(_verify_one(path, secret, args.anchor) for path in paths)
    if len(paths) > 1:
        print(f"{len(paths)} audit chains (one per replica): {len(paths) - broken} OK, {broken} broken")
    return 1 if broken else 0


def _verify_one(path: Path, secret: ServerSecret, anchor: Path | None) -> int:
    """Verify one chain and print its verdict; 1 when it is broken."""
    import sqlite3

    from services.think_api import audit

    try:
        verdict = audit.verify(path, secret, anchor)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path}: not a readable audit database ({err})") from None
    if not verdict.ok:
        print(
            f"{path}: BROKEN at row seq={verdict.broken_seq}: {verdict.reason} "
            f"({verdict.rows} rows read; chain intact up to seq={(verdict.broken_seq or 1) - 1})"
        )
        return 1
    anchored = "head matches the anchor" if verdict.anchored else "no --anchor: dropped newest rows cannot be told"
    print(f"{path}: OK, {verdict.rows} rows, chain intact under the secret; {anchored}; head hash {verdict.head}")
    return 0
