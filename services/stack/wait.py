"""A stage container starts with the stack and waits, bounded, for its upstream; then runs its command.

Why not only `depends_on`: after a host power loss the Docker daemon starts again the containers that were running
(`restart: on-failure`, moby issue 47846) but never one the compose CLI had not started yet, and the compose CLI
itself is gone. So `make pipeline` starts every stage at once; each waits here for its upstream's manifest on /data,
and the daemon brings all of them back after a reset, waiting ones included.

Freshness: the manifest of an earlier run is still on /data while this run rebuilds it, and must not release the
next stage early. When `SO8T_PIPELINE_ID` is set (`make pipeline` sets a new one each time), the upstream must also
have finished in this pipeline: every stage run through here leaves `<stack dir>/<name>.json` (pipeline id, exit
code) when its command ends, and a stage waits for exit code 0 under its own pipeline id. Without a pipeline id
(`make train`, `docker compose run`), only the manifest counts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared import atomic, logs, manifest
from shared.layout import data_dir

log = logs.get("stack")

AND = "&&"  # separates commands run one after the other (exec form has no shell)
EX_TEMPFAIL = 75  # exit code when the upstream did not finish in time
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Upstream:
    name: str
    manifest_dir: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> Upstream:
        """`NAME=DIR` (its manifest.json in DIR, and its finish marker) or `NAME` (only its finish marker)."""
        name, sep, directory = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or (sep and not directory):
            raise ValueError(f"--after {spec!r}: expected NAME or NAME=DIR")
        return cls(name, Path(directory) if directory else None)

    def describe(self) -> str:
        where = f"manifest {self.manifest_dir / manifest.MANIFEST}" if self.manifest_dir else "its finish marker"
        return f"{self.name} ({where})"


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `12h` or `7d`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (examples: 600, 30m, 12h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400 and s % 3600 == 0:
        return f"{s // 86400}d{(s % 86400) // 3600}h".removesuffix("0h")
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def marker_path(stack_dir: Path, name: str) -> Path:
    return Path(stack_dir) / f"{name}.json"


def read_marker(stack_dir: Path, name: str) -> dict | None:
    try:
        return json.loads(marker_path(stack_dir, name).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def write_marker(
    stack_dir: Path, name: str, pipeline_id: str, exit_code: int, commands: Sequence[Sequence[str]], started: float
) -> Path:
    path = marker_path(stack_dir, name)
    atomic.write_json(
        path,
        {
            "stage": name,
            "pipeline_id": pipeline_id,
            "exit_code": exit_code,
            "state": "done" if exit_code == 0 else "failed",
            "started_at": manifest.utc_stamp(started),
            "finished_at": manifest.utc_stamp(),
            "commands": [list(c) for c in commands],
        },
    )
    return path


def pending(up: Upstream, stack_dir: Path, pipeline_id: str) -> str | None:
    """None when `up` is done (for this pipeline, when there is one); else what is still missing, in words."""
    if up.manifest_dir is not None and manifest.read(up.manifest_dir) is None:
        return f"no manifest yet at {up.manifest_dir / manifest.MANIFEST}"
    if not pipeline_id:
        return None
    m = read_marker(stack_dir, up.name)
    if m is None:
        return f"{up.name} has not finished in pipeline {pipeline_id} yet"
    if m.get("pipeline_id") != pipeline_id:
        return (
            f"{up.name} has not finished in pipeline {pipeline_id} yet "
            f"(its last finish was in pipeline {m.get('pipeline_id')!r}, at {m.get('finished_at')})"
        )
    if m.get("exit_code") != 0:
        return f"{up.name} failed in this pipeline (exit {m.get('exit_code')}); waiting for its restart"
    return None


def wait_for(
    upstreams: Sequence[Upstream],
    *,
    name: str,
    stack_dir: Path,
    pipeline_id: str,
    timeout: float,
    interval: float = 10.0,
    report_every: float = 600.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Block until every upstream is done. Returns None, or why it gave up after `timeout` seconds (0: look once)."""
    if not upstreams:
        return None
    start = clock()
    scope = f"pipeline {pipeline_id}" if pipeline_id else "no pipeline id: any manifest counts"
    log.info(
        "%s waits for %s [%s]; gives up after %s",
        name,
        ", ".join(u.describe() for u in upstreams),
        scope,
        format_duration(timeout) if timeout else "one look",
    )
    last_reason, last_report = None, start
    while True:
        reasons = [r for r in (pending(u, stack_dir, pipeline_id) for u in upstreams) if r]
        now = clock()
        if not reasons:
            log.info("%s: upstream done after %s of waiting", name, format_duration(now - start))
            return None
        reason = "; ".join(reasons)
        if now - start >= timeout:
            return reason
        if reason != last_reason or now - last_report >= report_every:
            log.info("%s still waiting (%s so far): %s", name, format_duration(now - start), reason)
            last_reason, last_report = reason, now
        sleep(min(interval, max(0.0, timeout - (now - start))))


def split_commands(argv: Sequence[str]) -> list[list[str]]:
    """`a b && c d` as one argv list -> [[a, b], [c, d]]. Empty commands are an error."""
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == AND:
            commands.append([])
        else:
            commands[-1].append(arg)
    if any(not c for c in commands):
        raise ValueError(f"empty command in {' '.join(argv)!r} (a leading, trailing or doubled {AND!r})")
    return commands


class Forwarder:
    """Pass SIGTERM/SIGINT on to the running child (docker stop reaches the stage); while waiting, exit at once."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signalled: int | None = None

    def __call__(self, signum: int, _frame) -> None:
        self.signalled = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        else:
            raise SystemExit(128 + signum)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)


def run_commands(commands: Sequence[Sequence[str]], forwarder: Forwarder | None = None) -> int:
    """Run each command in turn; stop at the first non-zero exit (a signal death counts as 128 + signal, and so does
    a command that exits 0 after a SIGTERM/SIGINT was passed on to it: a stopped stage is never marked done)."""
    for argv in commands:
        log.info("running: %s", " ".join(argv))
        try:
            proc = subprocess.Popen(list(argv))
        except OSError as err:
            log.error("cannot start %s: %s", argv[0], err)
            return 127
        if forwarder is not None:
            forwarder.child = proc
        code = proc.wait()
        if forwarder is not None:
            forwarder.child = None
        code = 128 - code if code < 0 else code
        if code == 0 and forwarder is not None and forwarder.signalled:
            code = 128 + forwarder.signalled  # stopped from outside: never counts as done, even if it exited 0
        if code != 0:
            log.error("command failed with exit code %d: %s", code, " ".join(argv))
            return code
    return 0


def stack_dir_from_env() -> Path:
    return Path(os.environ.get("SO8T_STACK_DIR") or data_dir() / "stack")


@dataclass
class Job:
    """One stage as the stack runs it: its name (and finish marker), what it waits for, its command(s)."""

    name: str
    upstreams: list[Upstream]
    commands: list[list[str]]


def _durations(timeout: str, interval: str) -> tuple[float, float] | None:
    try:
        return parse_duration(timeout), parse_duration(interval)
    except ValueError as err:
        log.error("%s", err)
        return None


def _wait(job: Job, stack_dir: Path, limit: float, every: float, pipeline_id: str) -> bool:
    reason = wait_for(
        job.upstreams, name=job.name, stack_dir=stack_dir, pipeline_id=pipeline_id, timeout=limit, interval=every
    )
    if reason is None:
        return True
    hint = (
        "run that stage first (make <stage>)"
        if limit == 0
        else "check the upstream's logs (make logs) or raise SO8T_WAIT_TIMEOUT"
    )
    log.error(
        "%s gave up waiting after %s: %s; %s", job.name, format_duration(limit) if limit else "one look", reason, hint
    )
    return False


def wait_for_job(job: Job, stack_dir: Path, timeout: str, interval: str) -> int:
    """Wait for `job`'s upstreams only (before an exec); 0, or the exit code that says why not."""
    durations = _durations(timeout, interval)
    if durations is None:
        return 2
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))  # docker stop while waiting
    ok = _wait(job, stack_dir, *durations, os.environ.get("SO8T_PIPELINE_ID", "").strip())
    return 0 if ok else EX_TEMPFAIL


def run_jobs(jobs: Sequence[Job], stack_dir: Path, timeout: str, interval: str) -> int:
    """Each job in turn: wait for its upstreams, run its commands, leave its finish marker; stop at a failure."""
    durations = _durations(timeout, interval)
    if durations is None:
        return 2
    pipeline_id = os.environ.get("SO8T_PIPELINE_ID", "").strip()
    forwarder = Forwarder()
    forwarder.install()
    for job in jobs:
        started = time.time()
        if not _wait(job, stack_dir, *durations, pipeline_id):
            return EX_TEMPFAIL
        code = run_commands(job.commands, forwarder)
        path = write_marker(stack_dir, job.name, pipeline_id, code, job.commands, started)
        log.info("%s %s (exit %d); finish marker %s", job.name, "done" if code == 0 else "failed", code, path)
        if code != 0:
            return code
    return 0
