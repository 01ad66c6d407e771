"""The records an evaluation asks: the dataset stage's JSONL (messages, four_class_label; read by shared.sft), a
seeded sample per split.

A record's prompt is its system and user turns, rendered as the model saw them in training; the reference is the
final part of its assistant turn. A line that is not such a record is an error naming file and line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from shared import sft
from shared.errors import InputError
from shared.sft import SftRecord
from shared.think_format import LABELS, parse, render_chat


@dataclass(frozen=True)
class Record:
    id: str
    where: str  # file:line
    prompt: str  # rendered, ending with the assistant's turn marker
    user: str
    label: str
    reference: str  # the reference final answer


def _record(r: SftRecord) -> Record:
    where, messages, label = r.where, r.messages, r.label
    if messages is None:
        raise InputError(f"{where}: messages: expected a list of role/content objects")
    if label not in LABELS:
        raise InputError(f"{where}: four_class_label: {label!r} is not one of {', '.join(LABELS)}")
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: messages: the last turn must be the assistant's reference answer")
    asked = messages[:-1]
    users = [m["content"] for m in asked if m["role"] == "user"]
    if not users:
        raise InputError(f"{where}: messages: no user turn")
    reference = parse(messages[-1]["content"]).final or ""
    return Record(r.id or where, where, render_chat(asked, add_generation_prompt=True), users[-1], label, reference)


def load(path: str | Path, max_records: int | None, seed: int, split: str) -> list[Record]:
    """The split's records (a seeded sample of `max_records` when the file has more), in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: split file not found (split {split!r})")
    records = [_record(r) for r in sft.records(path)]
    if not records:
        raise InputError(f"{path}: no records (split {split!r})")
    if max_records is not None and max_records < len(records):
        keep = sorted(random.Random(f"eval:{seed}:{split}").sample(range(len(records)), max_records))
        records = [records[i] for i in keep]
    return records
