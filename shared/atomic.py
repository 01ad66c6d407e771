"""Crash-safe writes: temp path, fsync, rename. A crash never leaves a half artifact that looks whole."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("so8t.atomic")


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


def temp_file(path: str | Path) -> Path:
    """An empty temp file beside `path` (the `.name.*.tmp` pattern remove_stale_temps cleans up).

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
    """Open a temp file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    tmp = temp_file(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | Path) -> None:
    """Finish an interrupted replace_dir: bring back the old directory if the new one never arrived."""
    target = Path(target)
    old = _old_name(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `target`; on success it replaces `target` as a whole.

    On failure the temp directory is removed and the previous `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    for p in remove_stale_temps(target.parent, of=target.name):  # staging dirs of killed runs: each a whole copy
        log.info("removed %s, left by an interrupted run", p)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # a new directory's mode, not mkdtemp's 0700
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, target: Path) -> None:
    """fsync `src` and move it to `target`, replacing any previous directory there."""
    fsync_tree(src)
    old = _old_name(target)
    if target.exists():
        os.replace(target, old)
    os.replace(src, target)
    fsync_path(target.parent)
    if old.exists():
        shutil.rmtree(old)


def remove_stale_temps(directory: str | Path, of: str | None = None) -> list[Path]:
    """Remove leftovers of interrupted atomic writes (`.name.*.tmp`) in `directory`; only those of `of` if given."""
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    prefix = f".{of}." if of is not None else "."
    for p in sorted(directory.iterdir()):
        if p.name.startswith(prefix) and p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed
