"""Readable logs and progress bars for every stage."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# libraries that log the same warning on every call of a hot function: each of their message templates is shown
# once (bitsandbytes 0.50 warns "MatMul8bitLt: inputs will be cast ..." on every int8 matmul, ~4,000 lines an
# optimizer step of the full profile)
ONCE_PER_MESSAGE = ("bitsandbytes",)


class OncePerMessage(logging.Filter):
    """Drops repeats of a message template logged under one of `prefixes` (the first one passes, with a note)."""

    def __init__(self, prefixes: tuple[str, ...] = ONCE_PER_MESSAGE):
        super().__init__()
        self.prefixes, self.seen = prefixes, set[tuple[str, str]]()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        record.msg = f"{record.msg} (shown once; repeats of this message are not logged)"
        return True


def bars() -> bool:
    """Progress bars on: stderr is a terminal, or $SO8T_PROGRESS=1 ($SO8T_PROGRESS=0 turns them off)."""
    force = os.environ.get("SO8T_PROGRESS")
    return force == "1" or (force is None and sys.stderr.isatty())


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (pytest and tools swap it), never a closed one kept from setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup(level: str | int | None = None) -> None:
    """Configure root logging once: time, level, stage name, message. $SO8T_LOG_LEVEL overrides. Without bars (a
    container's log, a file), the libraries' own bars are off too: transformers' "Loading weights" bar alone
    writes a line per tensor (195 for Phi-3.5-mini) into every stage's log."""
    if not bars():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers
        if "transformers" in sys.modules:  # imported before this call: its switch was read already
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    level = level or os.environ.get("SO8T_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not any(getattr(h, "_so8t", False) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(OncePerMessage())
        handler._so8t = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"so8t.{name}")


LOG_PROGRESS_EVERY = 60.0  # seconds between the progress lines of a long loop when there is no bar


class _ProgressLines:
    """tqdm's output turned into log lines (a container's log, a file): one INFO line per update."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            get("progress").info("%s", text)

    def flush(self) -> None:
        pass


def progress(
    iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"
) -> tqdm:
    """A progress bar on stderr when it is a terminal (or $SO8T_PROGRESS=1). Otherwise a loop that outlasts
    LOG_PROGRESS_EVERY logs a line that often ("eval Q8_0 val: 3/20 [05:12<29:28, 104.00s/rec]") and one at its end,
    so a long stage in a container is never silent; a shorter loop logs nothing ($SO8T_PROGRESS=0: nothing at all)."""
    if bars():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=_ProgressLines(),
        disable=os.environ.get("SO8T_PROGRESS") == "0",
        delay=LOG_PROGRESS_EVERY,
        mininterval=LOG_PROGRESS_EVERY,
        bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
    )
