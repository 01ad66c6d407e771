"""Build train/val/rejects from four-class JSONL files. Nothing is lost: read = written + duplicates + rejected.

Two passes in bounded memory: pass 1 validates and renders each line, spooling accepted records to a temp file and
keeping only (label, split key) per record; pass 2 streams the spool into train/val. The split is stratified by
label and depends only on the records and the seed, so the same inputs and seed give byte-identical outputs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.dataset import quality
from services.dataset.options import DatasetOptions
from services.dataset.records import Reject, parse_line
from services.dataset.thinking import derive, from_existing
from shared import logs, manifest, stage
from shared.errors import InputError
from shared.think_format import render_assistant, render_chat, system_prompt

log = logs.get("dataset")
BUILDER_VERSION = 1
OUTPUTS = ("train.jsonl", "val.jsonl", "rejects.jsonl")

__all__ = ["DatasetOptions", "InputError", "build", "expand_inputs"]


@dataclass
class FileStats:
    read: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0


def expand_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matched:
            raise InputError(f"input {pattern!r} matches no file")
        files.extend(p for p in matched if p not in files)
    return files


def _record(obj: dict, src, opts: DatasetOptions, where: str) -> dict:
    parts = from_existing(src) or derive(src)
    try:
        assistant = render_assistant(parts[0], parts[1], opts.format)
    except ValueError as err:
        raise Reject("format_marker_in_text", f"cannot render: {err}") from None
    messages = [
        {"role": "system", "content": src.system or system_prompt(opts.format)},
        {"role": "user", "content": src.user},
        {"role": "assistant", "content": assistant},
    ]
    text = render_chat(messages)
    return {
        "id": hashlib.sha256(text.encode()).hexdigest()[:16],
        "messages": messages,
        "text": text,
        "four_class_label": src.label,
        "domain_label": src.domain or None,
        "safety_label": src.safety or None,
        "format": opts.format,
        "lang": src.lang,
        "quality": quality.score(parts[0].text()),
        "source": where,
    }


def _val_ids(keys: dict[str, list[tuple[str, int]]], ratio: float) -> set[int]:
    """Per label, the round(n·ratio) records with the smallest seeded keys go to val (train keeps at least one)."""
    val: set[int] = set()
    for items in keys.values():
        n = len(items)
        k = min(int(n * ratio + 0.5), n - 1) if ratio > 0 else 0
        val.update(idx for _, idx in sorted(items)[:k])
    return val


def build(patterns: list[str], output: str | Path, opts: DatasetOptions, force: bool = False) -> stage.StageResult:
    """Build the dataset in `output`; skipped when its manifest already matches the inputs and options."""
    started = time.time()
    files = expand_inputs(patterns)
    spec = stage.Spec(
        "dataset",
        Path(output),
        {str(p): manifest.describe_input(p) for p in files},
        opts.model_dump() | {"builder_version": BUILDER_VERSION},
    )
    return stage.run(spec, lambda tmp: _write(files, tmp, opts), force, started)


def _write(files: list[Path], out: Path, opts: DatasetOptions) -> stage.Built:
    """Pass 1 (validate, render, spool) and pass 2 (split) into `out`; returns the manifest's figures."""
    first = _FirstPass(files, opts)
    with (
        tempfile.TemporaryFile("w+", encoding="utf-8", dir=out) as spool,
        open(out / "rejects.jsonl", "w", encoding="utf-8", newline="\n") as rej,
    ):
        for path in files:
            first.read(path, spool, rej)
        first.check_usable()
        split = _split(spool, out, _val_ids(first.keys, opts.val_ratio))
    return stage.Built(first.metrics(split), {name: manifest.sha256_file(out / name) for name in OUTPUTS})


class _FirstPass:
    """Pass 1: every input line validated and rendered; records spooled in order, rejects written with their
    reason, duplicates counted; the figures the manifest reports."""

    def __init__(self, files: list[Path], opts: DatasetOptions):
        self.opts = opts
        self.per_file: dict[str, FileStats] = {str(p): FileStats() for p in files}
        self.reasons: Counter = Counter()
        self.labels: Counter = Counter()
        self.seen: set[bytes] = set()
        self.keys: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self.quality_scores: list[float] = []
        self.first_rejects: list[str] = []  # for the error when nothing is usable (rejects.jsonl goes with staging)
        self.count = 0

    def read(self, path: Path, spool: IO[str], rej: IO[str]) -> None:
        name = str(path)
        try:
            fh = open(path, "rb")
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror})") from None
        with fh:
            for lineno, raw in enumerate(logs.progress(fh, desc=path.name, unit="line"), start=1):
                raw = raw.rstrip(b"\r\n")
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # UTF-8 byte-order mark
                if not raw.strip():
                    continue  # blank lines are layout, not records
                self.per_file[name].read += 1
                try:
                    rec = self._render(raw, f"{name}:{lineno}")
                except Reject as r:
                    self._reject(rej, name, lineno, raw, r)
                    continue
                self._accept(rec, spool, self.per_file[name])

    def _render(self, raw: bytes, where: str) -> dict:
        if len(raw) > 1 << 20:
            raise Reject("line_too_long", f"line is {len(raw)} bytes (limit 1 MiB)")
        obj, src = parse_line(raw)
        rec = _record(obj, src, self.opts, where)
        if self.opts.min_quality is not None and rec["quality"] < self.opts.min_quality:
            raise Reject("low_quality", f"thinking quality {rec['quality']} < {self.opts.min_quality}")
        return rec

    def _reject(self, rej: IO[str], where_file: str, lineno: int, raw: bytes, r: Reject) -> None:
        row = {
            "file": where_file,
            "line": lineno,
            "reason": r.reason,
            "field": r.field,
            "message": r.message,
            "raw": raw.decode("utf-8", errors="backslashreplace"),
        }
        rej.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.per_file[where_file].rejected += 1
        self.reasons[r.reason] += 1
        if len(self.first_rejects) < 5:
            self.first_rejects.append(f"{where_file}:{lineno}: {r.reason}: {r.message}")

    def _accept(self, rec: dict, spool: IO[str], stats: FileStats) -> None:
        digest = hashlib.sha256(rec["text"].encode()).digest()
        if digest in self.seen:
            stats.duplicates += 1
            return
        self.seen.add(digest)
        self.keys[rec["four_class_label"]].append(
            (hashlib.sha256(f"{self.opts.seed}:{rec['text']}".encode()).hexdigest(), self.count)
        )
        self.quality_scores.append(rec["quality"])
        self.labels[rec["four_class_label"]] += 1
        spool.write(json.dumps(rec, ensure_ascii=False) + "\n")
        stats.written += 1
        self.count += 1

    def check_usable(self) -> None:
        if self.count == 0:
            raise InputError(
                f"no usable record in the input: every line was rejected ({dict(self.reasons)}):\n  "
                + "\n  ".join(self.first_rejects)
            )

    def metrics(self, split: Counter) -> dict:
        per_file, reasons, scores = self.per_file, self.reasons, self.quality_scores
        totals = {
            k: sum(getattr(s, k) for s in per_file.values()) for k in ("read", "written", "duplicates", "rejected")
        }
        assert totals["read"] == totals["written"] + totals["duplicates"] + totals["rejected"], totals
        return {
            **totals,
            "train": split["train"],
            "val": split["val"],
            "per_label": dict(sorted(self.labels.items())),
            "per_reason": dict(sorted(reasons.items())),
            "per_file": {k: vars(v) for k, v in per_file.items()},
            "quality": {
                "filter": self.opts.min_quality,
                "filtered": reasons.get("low_quality", 0),
                "mean": round(sum(scores) / len(scores), 4),
                "min": min(scores),
                "max": max(scores),
            },
        }


def _split(spool: IO[str], out: Path, val: set[int]) -> Counter:
    """Pass 2: the spooled records into train.jsonl and val.jsonl, in order; the count of each."""
    split: Counter = Counter()
    spool.seek(0)
    with (
        open(out / "train.jsonl", "w", encoding="utf-8", newline="\n") as train,
        open(out / "val.jsonl", "w", encoding="utf-8", newline="\n") as valf,
    ):
        for idx, line in enumerate(spool):
            (valf if idx in val else train).write(line)
            split["val" if idx in val else "train"] += 1
    return split
