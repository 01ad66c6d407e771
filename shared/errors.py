"""The one error family of every stage: a message that names the file and the fix, and the exit code it means.

The CLI edge (services/cli.py) catches StageError once, prints it and exits with its code; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class StageError(Exception):
    """A stage could not finish; the message says what, where and what to do."""

    exit_code = 1
    # set by shared.stage when the error passed through a build: the output that build would have replaced
    output: Path | None = None


class InputError(StageError):
    """Bad input, options or environment, found before anything was written."""

    exit_code = 2


class CheckFailed(StageError):
    """The artifact was built but failed its own verification; `report` holds the numbers measured."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


# --- a write the disk refused -------------------------------------------------------------------------------

# errnos that mean the filesystem refused a write, not that the code is wrong
DISK_ERRNOS = {
    errno.ENOSPC: "ENOSPC",
    errno.EDQUOT: "EDQUOT",
    errno.EFBIG: "EFBIG",
    errno.EROFS: "EROFS",
    errno.EIO: "EIO",
    errno.EACCES: "EACCES",
    errno.EPERM: "EPERM",
}
# what libraries that wrap the OS error in their own exception say (safetensors: "... (os error 28)")
_DISK_TEXT = re.compile(r"No space left on device|os error (28|122)|Disk quota exceeded|Read-only file system")
FULL_BYTES = 4 << 20  # a filesystem with less free than this right after a failed write was full


class DiskError(StageError):
    """A write failed because of the disk (full, quota, read-only, I/O error); the message names path and cause."""


def free_bytes(path: str | Path) -> int | None:
    """Free space where `path` (or its nearest existing parent) lives, as this user may use it."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _os_cause(err: BaseException | None) -> OSError | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def write_failure(err: BaseException, where: str | Path) -> DiskError | None:
    """`err`, raised while writing under `where`, as a DiskError naming the path and the cause when the disk is
    to blame: an OSError with a disk errno anywhere in its chain, a library error that says so, or (torch.save says
    only "unexpected pos") a filesystem left with almost no free space. None when the cause is something else."""
    if isinstance(err, DiskError):
        return err
    free = free_bytes(where)
    room = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
    os_err = _os_cause(err)
    if os_err is not None and os_err.errno is not None:
        path = os_err.filename or where
        cause = f"{os.strerror(os_err.errno)} ({DISK_ERRNOS[os_err.errno]})"
    elif _DISK_TEXT.search(str(err)) or (free is not None and free < FULL_BYTES):
        path, cause = where, "no space left on device (ENOSPC)"
    else:
        return None
    detail = "" if isinstance(err, OSError) else f" [{type(err).__name__}: {str(err)[:200]}]"
    return DiskError(f"{path}: cannot write: {cause}{room}{detail}; make room (or fix the disk) and run it again")
