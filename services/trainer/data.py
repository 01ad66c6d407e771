"""The SFT data: JSONL records -> token ids with labels on the assistant spans only, and a resumable order.

A record has `messages` (system/user/assistant turns) and/or `text` (the Phi-3.5 rendering of them,
shared.think_format.render_chat). The loss covers each assistant turn's content and its `<|end|>`; everything
rendered before it (`render_chat(messages[:i], add_generation_prompt=True)`: system, user, `<|assistant|>\\n`)
and after it is masked with -100. Tokens are matched to characters with the fast tokenizer's offsets, so the
ids are exactly those of tokenising the whole text once (as llama.cpp and Ollama see a prompt).

Order: epoch e visits the examples in a permutation seeded by (seed, e), `batch_size` at a time; micro-batch j
of the endless stream is a pure function of j, so a resumed run continues at the saved stream position.

Forwards (`micro_batches`): without packing each micro-batch is one forward, its records right-padded to the
longest. With packing (`train.packing`) the records a process handles in one optimizer step are packed first-fit,
in stream order, into rows of at most `seq_len` tokens, one row per forward: positions restart at 0 for each
record, so transformers' Phi-3 attends block-diagonally (its padding-free path: no attention mask, the record
boundaries read from `position_ids`), each record's first label is IGNORE (nothing predicts across a boundary)
and `segments` tells PET where each record starts and ends. The packing is a pure function of the step's
records, so the stream order, exact resume and the optimizer step (same records, same normalisation) are those
of the unpacked run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import logs
from shared.sft import RecordError, check_messages, records
from shared.think_format import ASSISTANT, END, render_chat

IGNORE = -100
log = logs.get("trainer")


DataError = RecordError  # a dataset problem; the message names the file and line (shared.sft reads the records)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside assistant spans
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Positions that contribute to the loss (a label at position 0 has no previous token to predict it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)

    @property
    def has_pet(self) -> bool:
        """Whether the record has a PET term (three tokens in a row)."""
        return len(self.input_ids) >= 3


def assistant_spans(record: dict, where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character spans of assistant content + <|end|>])."""
    if "messages" in record:
        messages = check_messages(record["messages"], where)
        text = render_chat(messages)
        if "text" in record and record["text"] != text:
            raise DataError(f"{where}: 'text' differs from 'messages' rendered with the Phi-3.5 template")
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(render_chat(messages[:i], add_generation_prompt=True))
                end = start + len(m["content"]) + len(END)
                assert text[start:end] == m["content"] + END, "render_chat is not prefix-stable"
                spans.append((start, end))
    elif isinstance(record.get("text"), str):
        text = record["text"]
        spans = []
        opener = f"{ASSISTANT}\n"
        at = text.find(opener)
        while at >= 0:
            start = at + len(opener)
            stop = text.find(END, start)
            if stop < 0:
                raise DataError(f"{where}: assistant turn without {END} in 'text'")
            spans.append((start, stop + len(END)))
            at = text.find(opener, stop)
    else:
        raise DataError(f"{where}: record has neither 'messages' nor a string 'text'")
    if not spans:
        raise DataError(f"{where}: no assistant turn to learn from")
    return text, spans


def tokenize(tokenizer, text: str, spans: Sequence[tuple[int, int]], seq_len: int) -> Example:
    """Token ids of `text` (no BOS added, as the Phi-3.5 template) truncated to `seq_len`; labels = ids inside spans.

    A token is labelled when its first character lies inside an assistant span; a token that starts before the
    span (e.g. `<|assistant|>\\n`) is prompt.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    truncated = len(enc["input_ids"]) > seq_len
    ids, offsets = enc["input_ids"][:seq_len], enc["offset_mapping"][:seq_len]
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        inside = any(s <= a < e for s, e in spans) and b > a
        labels.append(tok if inside else IGNORE)
    return Example(list(ids), labels, truncated)


@dataclass
class Dataset:
    examples: list[Example]
    path: Path
    truncated: int
    dropped: int

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def load(path: str | Path, tokenizer, seq_len: int, sample: int | None = None, seed: int = 0) -> Dataset:
    """Read and tokenise a JSONL file; bad lines are errors naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the trainer needs a fast tokenizer (tokenizer.json) for character offsets")
    rows = [(r.where, *assistant_spans(r.fields, r.where)) for r in records(path)]
    if not rows:
        raise DataError(f"{path}: no records")
    if sample is not None and sample < len(rows):
        keep = sorted(random.Random(f"sample:{seed}").sample(range(len(rows)), sample))
        rows = [rows[i] for i in keep]
    examples, truncated, dropped = [], 0, 0
    for where, text, spans in logs.progress(rows, desc="tokenise", unit="rec"):
        ex = tokenize(tokenizer, text, spans, seq_len)
        truncated += ex.truncated
        if ex.n_targets == 0:
            dropped += 1
            if dropped <= 10:
                log.warning("%s: no assistant token left within seq_len %d, record skipped", where, seq_len)
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no record has an assistant token within seq_len {seq_len}")
    if dropped > 10:
        log.warning("%d records skipped in all (no assistant token within seq_len %d)", dropped, seq_len)
    if truncated:
        log.warning("%d of %d records are longer than seq_len %d and were truncated", truncated, len(rows), seq_len)
    return Dataset(examples, path, truncated, dropped)


class Order:
    """The endless, seeded stream of micro-batches (lists of example indices)."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(self.n))
            random.Random(f"order:{self.seed}:{epoch}").shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1]

    def micro_batch(self, j: int) -> list[int]:
        epoch, pos = divmod(j, self.per_epoch)
        return self.permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]

    def epoch_of(self, j: int) -> float:
        return j / self.per_epoch


def total_steps(per_epoch: int, epochs: float, world_size: int, grad_accum: int, max_steps: int | None) -> int:
    """Optimizer steps: max_steps when set, else enough steps for `epochs` passes over the micro-batches."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * per_epoch / (world_size * grad_accum)))


def collate(examples: Sequence[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return ids, mask, labels


# --- forwards: padded micro-batches or packed rows ---------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """The tensors of one forward. `segments` [B, T]: 0 on padding, s > 0 on the tokens of the batch's s-th record.
    Unpacked: `attention_mask` set, `position_ids` None (0, 1, … per row). Packed: `position_ids` restart at 0 per
    record and `attention_mask` is None (transformers then derives block-diagonal attention from the positions)."""

    input_ids: Any
    labels: Any
    segments: Any
    attention_mask: Any = None
    position_ids: Any = None

    @property
    def real_tokens(self) -> int:
        return int((self.segments != 0).sum())

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            *(move(t) for t in (self.input_ids, self.labels, self.segments, self.attention_mask, self.position_ids))
        )

    def inputs(self) -> dict[str, Any]:
        """Keyword arguments of Objective.forward."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "segments": self.segments,
        }


def padded(examples: Sequence[Example], pad_id: int) -> Batch:
    """One forward of whole records, one per row, right-padded (`collate`)."""
    import torch

    ids, mask, labels = collate(examples, pad_id)
    segments = mask * torch.arange(1, len(examples) + 1).unsqueeze(1)
    return Batch(ids, labels, segments, attention_mask=mask)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit packing: item i (in order) goes into the first row that still has `lengths[i]` free, else into a
    new row. Returns each row's item indices (rows in the order they were opened, items in order within a row).
    Every length must be at most `capacity`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than a row's {capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def packed(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    """Rows of several records each: positions restart at 0 per record, each record's first label is IGNORE (the
    previous record's last token does not predict it), segments number the records 1, 2, … across the batch.
    Rows shorter than the longest are padded at the end; the padding is a sequence of its own (positions 0, 1, …)
    with label IGNORE and segment 0, so no real token attends to it."""
    import torch

    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    seg = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            seg += 1
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            segments[r, at : at + n] = seg
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return Batch(ids, labels, segments, position_ids=positions)


def micro_batches(groups: Sequence[Sequence[Example]], packing: bool, seq_len: int, pad_id: int) -> list[Batch]:
    """The forwards of one process for one optimizer step. `groups`: its micro-batches of the stream, in order.

    Without packing: one padded forward per micro-batch. With packing: all their records, in order, packed first-fit
    into rows of at most `seq_len` tokens, one row per forward."""
    if not packing:
        return [padded(g, pad_id) for g in groups]
    records = [e for g in groups for e in g]
    rows = first_fit([len(e.input_ids) for e in records], seq_len)
    return [packed([[records[i] for i in row]], pad_id) for row in rows]
