"""Run a stage in the compose stack: wait (bounded) for its upstream's manifest on /data, then run its command(s).

    python -m services.stack --name trainer --after dataset=/data/datasets/four_class -- python -m services.trainer ...

Several commands run one after the other when separated by a literal `&&` argument. When the command ends, the
stage's finish marker (`$SO8T_STACK_DIR/<name>.json`: pipeline id, exit code) tells its downstream stages.
Environment: SO8T_PIPELINE_ID (set by `make pipeline`), SO8T_STACK_DIR, SO8T_WAIT_TIMEOUT (default 7d; 0 = look
once and fail at once), SO8T_WAIT_INTERVAL (default 10s).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="this stage's name (its finish marker is <stack dir>/<name>.json)")
    p.add_argument("--after", action="append", default=[], metavar="NAME[=DIR]",
                   help="upstream stage that must be done first: its manifest.json in DIR, and, under a pipeline "
                        "id, its finish marker from this pipeline; repeat for several")
    p.add_argument("--timeout", default=os.environ.get("SO8T_WAIT_TIMEOUT", "7d"),
                   help="give up waiting after this long (600, 30m, 12h, 7d; 0 = look once). "
                        "Default $SO8T_WAIT_TIMEOUT or 7d")
    p.add_argument("--interval", default=os.environ.get("SO8T_WAIT_INTERVAL", "10s"), help="poll interval (10s)")
    p.add_argument("--stack-dir", default=None, help="finish markers (default $SO8T_STACK_DIR, else $DATA_DIR/stack)")
    p.add_argument("command", nargs="*", metavar="-- COMMAND",
                   help="the stage command, after --; further commands after a literal && argument")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from services.stack.wait import (EX_TEMPFAIL, Upstream, Forwarder, format_duration, log, parse_duration,
                                     run_commands, split_commands, stack_dir_from_env, wait_for, write_marker)

    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        upstreams = [Upstream.parse(s) for s in args.after]
        timeout, interval = parse_duration(args.timeout), parse_duration(args.interval)
        commands = split_commands(argv) if argv else []
    except ValueError as err:
        print(f"python -m services.stack: {err}", file=sys.stderr)
        return 2
    if not commands:
        print("python -m services.stack: no command given (put it after --)", file=sys.stderr)
        return 2
    stack_dir = Path(args.stack_dir) if args.stack_dir else stack_dir_from_env()
    pipeline_id = os.environ.get("SO8T_PIPELINE_ID", "").strip()

    forwarder = Forwarder()
    forwarder.install()
    started = time.time()
    reason = wait_for(upstreams, name=args.name, stack_dir=stack_dir, pipeline_id=pipeline_id,
                      timeout=timeout, interval=interval)
    if reason is not None:
        hint = ("run that stage first (make <stage>)" if timeout == 0
                else "check the upstream's logs (make logs) or raise SO8T_WAIT_TIMEOUT")
        waited = format_duration(timeout) if timeout else "one look"
        log.error("%s gave up waiting after %s: %s; %s", args.name, waited, reason, hint)
        return EX_TEMPFAIL
    code = run_commands(commands, forwarder)
    path = write_marker(stack_dir, args.name, pipeline_id, code, commands, started)
    log.info("%s %s (exit %d); finish marker %s", args.name, "done" if code == 0 else "failed", code, path)
    return code
