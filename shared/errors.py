"""The one error family of every stage: a message that names the file and the fix, and the exit code it means.

The CLI edge (services/cli.py) catches StageError once, prints it and exits with its code; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

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
