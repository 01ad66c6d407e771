"""The dataset stage's SFT records (train.jsonl, val.jsonl): one record type and one reader for every stage that
reads them (the trainer, eval, the tiny model).

A line is a JSON object with `messages` (system/user/assistant turns with string content) and/or `text` (their
Phi-3.5 rendering, shared.think_format.render_chat), beside whatever else the dataset stage writes (`id`,
`four_class_label`, ...). Blank lines are skipped; any other line that is not such a record is a RecordError naming
file and line. Before it is read, the file is checked against the manifest of the stage that wrote it
(`stage.verified_input`: a file its manifest lists must have the sha256 written there); a file no manifest lists is
read as it is, and the log says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import logs, manifest, stage
from shared.errors import InputError

ROLES = ("system", "user", "assistant")
log = logs.get("records")


class RecordError(InputError, ValueError):
    """A dataset record problem; the message names the file and line."""


@dataclass(frozen=True)
class SftRecord:
    where: str  # file:line
    fields: dict[str, Any]  # the line's object, as written
    messages: list[dict[str, str]] | None  # the turns, checked; None for a record that has only `text`

    @property
    def text(self) -> str | None:
        text = self.fields.get("text")
        return text if isinstance(text, str) else None

    @property
    def id(self) -> str | None:
        value = self.fields.get("id")
        return str(value) if value else None

    @property
    def label(self) -> Any:
        """The four-class label as written (callers that need one check it)."""
        return self.fields.get("four_class_label")


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """`value` as a record's turns: a non-empty list of {role, content} strings with a known role."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(f"{where}: messages[{k}].role {m['role']!r} is not system/user/assistant")
    return value


def parse_line(raw: bytes, where: str) -> SftRecord:
    """One non-blank line as a record."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{where}: not a JSON line ({err})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = check_messages(obj["messages"], where) if "messages" in obj else None
    if messages is None and not isinstance(obj.get("text"), str):
        raise RecordError(f"{where}: record has neither 'messages' nor a string 'text'")
    return SftRecord(where, obj, messages)


def records(path: str | Path) -> Iterator[SftRecord]:
    """The records of `path`, in file order, one line at a time (an error names the first bad line), after
    checking the file against its stage's manifest."""
    path = Path(path)
    verify(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield parse_line(raw, f"{path}:{lineno}")


def verify(path: Path) -> None:
    """Check `path` against the manifest of the stage that wrote it (InputError when it differs); say so plainly
    when no manifest lists it."""
    stage.verified_input(path)
    m = manifest.read(path.parent)
    listed = isinstance(m, dict) and any(path.name in (m.get(key) or {}) for key in ("files", "sha256"))
    if not listed:
        log.info("%s: no manifest beside it lists this file: read as it is, unchecked", path)
