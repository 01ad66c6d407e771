"""The fault campaign's machinery: run a stage, kill it, fill its disk, flip its bytes, and judge what survived.

Used by tests/faults (a few trials of each, in `make test`) and by bench/faults.py (dozens, the README's table).
Every trial ends in an outcome; a broken promise (a lost or half artifact, a leftover that outlives the next run, a
helper process outliving its stage, a corrupt file used, an unaudited 200) is a violation, and callers assert that
there are none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared import manifest, stage  # noqa: E402
from shared.errors import InputError  # noqa: E402

# what a killed atomic write or stage leaves: `.<target>.<random>.tmp`, `.<target>.old`
LEFTOVER = re.compile(r"^\.(?P<target>.+?)\.(?:[A-Za-z0-9_]+\.tmp|old|del\.tmp)$")


def env(**extra: str) -> dict[str, str]:
    """The environment of a stage process: this checkout first on the path, no progress bars, no fault hook."""
    e = dict(os.environ, PYTHONPATH=str(REPO), SO8T_PROGRESS="0", PYTHONUNBUFFERED="1")
    e.pop("SO8T_FAULT", None)
    e.update(extra)
    return e


def cli(module: str, *args: str | Path) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run(argv: list[str], environ: dict[str, str] | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=environ or env(), capture_output=True, text=True, timeout=timeout)


def timed(argv: list[str], environ: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = run(argv, environ)
    return r, time.monotonic() - t0


def must(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        raise AssertionError(f"{what} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


# --- what is on disk ---------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return manifest.sha256_file(path)


def digests(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, str] | None:
    """relative path -> sha256 of every file under `root` (leftovers excluded); None when `root` does not exist."""
    if not root.is_dir():
        return None
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(LEFTOVER.match(part) for part in rel.split("/")) and not skip(rel):
            out[rel] = sha256(p)
    return out


def leftovers(scope: Path) -> list[Path]:
    """Every leftover of an interrupted write under `scope` (files and directories, not what is inside them)."""
    found: list[Path] = []
    if not scope.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(scope):
        for name in list(dirnames) + filenames:
            if LEFTOVER.match(name):
                found.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if not LEFTOVER.match(d)]
    return sorted(found)


def piled_up(scope: Path) -> list[str]:
    """Targets with more than one leftover beside them: leftovers that accumulate instead of being removed."""
    count = Counter((p.parent, LEFTOVER.match(p.name)["target"]) for p in leftovers(scope))  # type: ignore[index]
    return [f"{parent}/{target} x{n}" for (parent, target), n in count.items() if n > 1]


def verifies(output: Path) -> str | None:
    """None when `output` is a complete artifact: a manifest, every file it lists there with its size and sha256,
    and nothing it does not list. Else why not."""
    if not (output / manifest.MANIFEST).is_file():
        return f"{output}: no manifest"
    try:
        stage.verified_input(output)
    except InputError as err:
        return str(err)
    m = manifest.read(output) or {}
    present = set(digests(output) or {}) - {manifest.MANIFEST}
    unlisted = sorted(present - set(m.get("files", {})))
    return f"{output}: files the manifest does not list: {unlisted}" if unlisted else None


def content_digest(path: Path) -> str:
    """sha256 of a file's content: its bytes, except that a safetensors header counts as the JSON it holds (the
    safetensors writer puts `__metadata__` keys in hash order, so equal files can differ in that order)."""
    if path.suffix != ".safetensors":
        return sha256(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + data[8 + n :]).hexdigest()


def artifact_key(output: Path, volatile: frozenset[str] = frozenset(), inputs: bool = True) -> dict[str, Any] | None:
    """What makes two builds the same artifact: the stage, its config (and inputs), every file's content
    (`volatile` files, whose bytes carry timings, excepted); the manifest's timings and versions are not part of it.
    A chain compares each stage without its inputs' hashes (those hash the upstream's bytes, compared there)."""
    m = manifest.read(output)
    if m is None or not output.is_dir():
        return None
    files = {
        p.relative_to(output).as_posix(): content_digest(p)
        for p in sorted(output.rglob("*"))
        if p.is_file() and p.name != manifest.MANIFEST and p.relative_to(output).as_posix() not in volatile
    }
    key = {"stage": m.get("stage"), "config_hash": m.get("config_hash"), "files": files}
    if inputs:
        key["inputs"] = manifest.input_hashes(m.get("inputs", {}))
    return key


def restore(copy: Path, output: Path) -> None:
    """Put `copy` back at `output` (the previous good artifact, for the next trial)."""
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(copy, output)


# --- processes ---------------------------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


@dataclass
class Killed:
    at: float | None  # seconds after the start; None: killed by a fault hook or never
    finished_first: bool  # the run ended before the kill came
    returncode: int | None
    survivors: list[int]  # processes of the killed run still alive after its main process died
    output: str


def kill_at(argv: list[str], at: float | None, environ: dict[str, str], group: bool = False) -> Killed:
    """Start `argv`; SIGKILL it `at` seconds later (the main process alone, or its whole process group: a power
    cut). With `at` None it runs until it ends (a fault hook in the environment kills it). Helpers of the killed
    process must die with it (shared.stage.die_with_parent): the survivors are reported, then killed."""
    with open(os.devnull, "rb") as devnull:
        p = subprocess.Popen(
            argv,
            cwd=REPO,
            env=environ,
            stdin=devnull,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    out: list[str] = []
    reader = _drain(p, out)
    finished = True
    try:
        p.wait(timeout=at)
    except subprocess.TimeoutExpired:
        finished = False
        (os.killpg if group else os.kill)(p.pid, signal.SIGKILL)
        p.wait()
    survivors: list[int] = []
    deadline = time.monotonic() + 10
    while (survivors := group_members(p.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # a helper gets its SIGKILL from the kernel as its parent dies
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    reader.join(10)
    return Killed(at, finished, p.returncode, survivors, "".join(out))


def _drain(p: subprocess.Popen, out: list[str]):
    import threading

    def read() -> None:
        for line in p.stdout:  # type: ignore[union-attr]
            out.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


# --- the tally of one (stage, fault) -------------------------------------------------------------------------------


@dataclass
class Tally:
    stage: str
    fault: str
    trials: int = 0
    outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self, outcome: str) -> None:
        self.trials += 1
        self.outcomes[outcome] += 1

    def bad(self, what: str) -> None:
        self.trials += 1
        self.outcomes["VIOLATION"] += 1
        self.violations.append(what)

    def check(self, what: str | None) -> None:
        """A check after the trial's outcome was counted: a violation without another trial."""
        if what:
            self.outcomes["VIOLATION"] += 1
            self.violations.append(what)

    def outcome(self) -> str:
        parts = [f"{name} {n}" for name, n in self.outcomes.most_common() if name != "VIOLATION"]
        parts.append(f"**{len(self.violations)} violations**" if self.violations else "0 violations")
        return "; ".join(parts + self.notes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "fault": self.fault,
            "trials": self.trials,
            "outcomes": dict(self.outcomes),
            "violations": self.violations,
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }

    def assert_clean(self) -> None:
        assert not self.violations, f"{self.stage} / {self.fault}:\n  " + "\n  ".join(self.violations)


def table(tallies: list[Tally]) -> str:
    """The README's "faults survived" table."""
    lines = ["| stage | fault | trials | outcome |", "|---|---|---:|---|"]
    for t in tallies:
        lines.append(f"| {t.stage} | {t.fault} | {t.trials} | {t.outcome()} |")
    return "\n".join(lines)


# --- the disk: a small filesystem, filled --------------------------------------------------------------------------


def mount_refusal() -> str | None:
    """Why this process cannot mount a small tmpfs (None when it can): it needs root and CAP_SYS_ADMIN."""
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    probe = Path(f"/tmp/so8t-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode != 0:
            return f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode})"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    except FileNotFoundError:
        return "no mount command"
    finally:
        probe.rmdir()


@contextlib.contextmanager
def small_fs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


FILLER = "filler.bin"


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def fill(fs: Path, leave: int) -> int:
    """Write a filler file on `fs` until `leave` bytes (rounded to pages) are free; returns the free space left."""
    (fs / FILLER).unlink(missing_ok=True)
    todo = max(0, free(fs) - leave)
    with open(fs / FILLER, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        while todo > 0:
            try:
                todo -= fh.write(chunk[: min(len(chunk), todo)])
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break
    return free(fs)


def unfill(fs: Path) -> None:
    (fs / FILLER).unlink(missing_ok=True)


def disk_message(text: str, fs: Path) -> str | None:
    """None when `text` (a stage's stderr) says a write under `fs` failed for lack of space, without a traceback."""
    if "Traceback" in text:
        return "a traceback instead of a message: " + text[-1500:]
    if str(fs) not in text:
        return f"the message does not name a path under {fs}: " + text[-800:]
    if "No space left on device" not in text and "ENOSPC" not in text:
        return "the message does not give the cause (no space left): " + text[-800:]
    return None


# --- corruption -----------------------------------------------------------------------------------------------------


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at `offset` of `path` with `mask` (in place, same size, same mtime: as a disk would)."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ mask]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def digest_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
