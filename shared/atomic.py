"""Crash-safe writes: temp path, fsync, rename. A crash never leaves a half artifact that looks whole.

Every temp file and staging directory is named `.<target>.<random>.tmp`, beside its target, and is held under an
exclusive flock by the process writing it for as long as it exists under that name. Leftovers of killed writers
are removed by one mechanism, `remove_stale_temps`: it removes the `.<target>.*.tmp` that no live process holds
(a lock dies with its process, SIGKILL and power loss included) and leaves a live writer's alone. Every atomic
write calls it for its own target first, so the next write of anything removes what an earlier, killed write of
it left. A directory is replaced by an atomic exchange (renameat2 RENAME_EXCHANGE) where the filesystem has it:
at every instant the target is the old directory or the new one, never missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("so8t.atomic")
FAULT_ENV = "SO8T_FAULT"


def fault(point: str) -> None:
    """Test hook: SIGKILL this process at `point` when $SO8T_FAULT names it (tests/faults use it to land a kill
    at an exact instant: `staging-built` (shared.stage: the output built, no manifest yet), `replace-dir` (the new
    directory in place, the old one not yet removed); the trainer has its own points, same variable)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (files first, then their directories)."""
    for dirpath, _, files in os.walk(Path(root), topdown=False):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the owner's lock on a temp -------------------------------------------------------------------------------


def _lock(fd: int, block: bool) -> bool | None:
    """flock LOCK_EX on `fd`: True when taken, False when another open file holds it, None when this filesystem
    has no flock (then nothing can tell a live writer's temp from a dead one's, and cleaning stays as it was)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EBADF (NFS emulating flock needs a writable descriptor)


def _hold(path: Path) -> int | None:
    """Lock the temp `path` just made; None when it was removed meanwhile (a cleaner took it for a dead one's)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    _lock(fd, block=True)
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def _new_temp(target: Path, make: Callable[..., str | tuple[int, str]]) -> tuple[Path, int]:
    """A fresh temp for `target` (made by mkstemp or mkdtemp), held under its lock: (path, lock fd)."""
    for _ in range(100):
        made = make(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        if isinstance(made, tuple):
            os.close(made[0])
            made = made[1]
        tmp = Path(made)
        fd = _hold(tmp)
        if fd is not None:
            return tmp, fd
    raise OSError(errno.EAGAIN, f"could not hold a temp beside {target}")


def _release(fd: int) -> None:
    os.close(fd)


def remove_stale_temps(directory: str | Path, of: str | None = None) -> list[Path]:
    """Remove leftovers of interrupted atomic writes (`.name.*.tmp`) in `directory`, only those of `of` if given,
    that no live process holds; returns what was removed."""
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    prefix = f".{of}." if of is not None else "."
    for p in sorted(directory.iterdir()):
        if not (p.name.startswith(prefix) and p.name.endswith(".tmp")):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue  # its writer finished (or another cleaner was first)
        try:
            if _lock(fd, block=False) is False:
                continue  # a live writer's
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def _clean(target: Path) -> None:
    for p in remove_stale_temps(target.parent, of=target.name):
        log.info("removed %s, left by an interrupted write", p)


# --- files ------------------------------------------------------------------------------------------------------


def temp_file(path: str | Path) -> Path:
    """An empty temp file beside `path` (the `.name.*.tmp` pattern remove_stale_temps cleans up), not held.

    Its mode is a new file's (0666 less the umask), not mkstemp's 0600: the next stage may run as another user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a held temp file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean(path)
    tmp, held = _new_temp(path, tempfile.mkstemp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not err.filename:  # a refused write() names no file: name the target
            err.filename = str(path)
        raise
    finally:
        _release(held)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


# --- directories ------------------------------------------------------------------------------------------------


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | Path) -> None:
    """Finish an interrupted two-rename replace_dir: bring back the old directory if the new one never arrived."""
    target = Path(target)
    old = _old_name(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty, held temp directory beside `target`; on success it replaces `target` as a whole.

    Staging directories of killed runs (each a whole copy) are removed first. On failure the temp directory is
    removed and the previous `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    _clean(target)
    tmp, held = _new_temp(target, tempfile.mkdtemp)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # a new directory's mode, not mkdtemp's 0700
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(held)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically (Linux renameat2); False where the system or filesystem cannot."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(code)}")


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def replace_dir(src: Path, target: Path) -> None:
    """fsync `src` and move it to `target`, replacing any previous directory there.

    With an existing target the two are exchanged in one step and the old one, now under `src`'s temp name, is
    removed (a kill before that leaves it as a leftover for remove_stale_temps). Where the filesystem cannot
    exchange, the old one is renamed aside first (`.target.old`, which recover_dir brings back if needed).
    """
    fsync_tree(src)
    if target.exists() and _exchange(src, target):
        fsync_path(target.parent)
        fault("replace-dir")
        shutil.rmtree(src, ignore_errors=True)
        return
    old = _old_name(target)
    if target.exists():
        os.replace(target, old)
    os.replace(src, target)
    fsync_path(target.parent)
    fault("replace-dir")
    if old.exists():
        shutil.rmtree(old)
