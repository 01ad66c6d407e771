"""Pretraining of the tiny base on a train split's content, without the /think layout.

A random tiny Phi-3 has frozen random embeddings and head under LoRA: no LoRA stage can make it write. The real
Borea base already writes Japanese and English; the demo's tiny base is made to write the same way, once (cached):
all parameters trained on two documents per conversation turn of the split:

- the chat turn with the *final answer only* (system, user, assistant = the reference answer): it learns to answer;
- a plain document: the request, the assessment sentences of its thinking as prose (no heading, no tag, no verdict
  line), then the answer: it learns the language of the assessments.

Neither has the /think layout, a verdict line or the thinking in the assistant turn: the untrained base writes 0%
of the format; the LoRA + SO(8) stage is what teaches it, and the eval stage measures both.
The loss covers the real vocabulary only: the padding pieces that fill the tokenizer to Phi-3's 32000 ids keep
zero rows (embedding and head), so greedy decoding never picks one.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from services.tiny_model.options import TinyOptions
from shared import logs, sft
from shared.errors import InputError
from shared.think_format import parse, render_chat
from shared.tiny import SP_PIECES, SPECIAL_TOKENS, VOCAB_SIZE

log = logs.get("tiny-model")
_VERDICT = ("判定", "Verdict")


def _turns(messages: list[dict], where: str) -> list[tuple[str | None, str, str]]:
    """(system, user, assistant) of each answered user turn."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), None)
    out, user = [], None
    for m in messages:
        if m.get("role") == "user":
            user = m.get("content", "")
        elif m.get("role") == "assistant" and user is not None:
            out.append((system, user, m.get("content", "")))
            user = None
    if not out:
        raise InputError(f"{where}: messages: no user turn with an assistant answer")
    return out


def _documents(system: str | None, user: str, assistant: str) -> list[str]:
    """Two documents of an answered turn: the chat with the final answer only, and the request with the thinking's
    prose (verdict lines left out) and the answer."""
    p = parse(assistant)
    final, thinking = (p.final, p.thinking) if p.ok and p.final is not None else (assistant, None)
    chat = [{"role": "system", "content": system}] if system else []
    prose = [ln for ln in (thinking or "").split("\n") if ln.strip() and not ln.startswith(_VERDICT)]
    return [
        render_chat([*chat, {"role": "user", "content": user}, {"role": "assistant", "content": final}]),
        "\n".join([user, *prose, final]),
    ]


def documents(path: Path) -> tuple[list[str], list[str]]:
    """(pretraining documents, the tokenizer's text: every line of every message) of a dataset split."""
    docs: list[str] = []
    lines: list[str] = []
    for r in sft.records(path):
        if r.messages is None:
            raise InputError(f"{r.where}: not a record of the dataset stage (no 'messages')")
        lines += [ln for m in r.messages for ln in m["content"].split("\n") if ln.strip()]
        for system, user, assistant in _turns(r.messages, r.where):
            docs += _documents(system, user, assistant)
    if not docs:
        raise InputError(f"{path}: no records to pretrain on")
    return docs, lines


def pretrain(model_dir: Path, docs: list[str], opts: TinyOptions) -> dict[str, Any]:
    """Train every parameter of the tiny model in `model_dir` on `docs`; saves it back; returns the figures."""
    import torch
    from transformers import AutoTokenizer, Phi3ForCausalLM

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    live, unused, index = _vocabulary(tok)
    seqs = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]

    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    params = list(model.parameters())
    optimizer, schedule = _optimizer(params, opts)

    def zero_unused() -> None:
        with torch.no_grad():
            model.lm_head.weight[unused] = 0
            model.model.embed_tokens.weight[unused] = 0

    zero_unused()
    model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in logs.progress(range(opts.pretrain_steps), desc="pretrain", unit="step"):
        if len(order) < opts.pretrain_batch:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order += perm
        batch, order = order[: opts.pretrain_batch], order[opts.pretrain_batch :]
        ids, mask = _padded([seqs[i] for i in batch])
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        keep = mask[:, 1:].bool()
        logits = hidden[:, :-1][keep] @ model.lm_head.weight[live].T  # a softmax over the real vocabulary
        loss = torch.nn.functional.cross_entropy(logits, index[ids[:, 1:][keep]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        zero_unused()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    return _figures(docs, seqs, opts.pretrain_steps, len(live), losses, t0)


def _vocabulary(tok: Any) -> tuple[Any, Any, Any]:
    """(the live token ids: real pieces and special tokens, a mask of the unused ids, each id's index among the
    live ones or -100)."""
    import torch

    real = [i for i in range(SP_PIECES) if not tok.convert_ids_to_tokens(i).startswith("<unused")]
    live = torch.tensor(sorted(set(real) | set(SPECIAL_TOKENS.values())))
    unused = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    unused[live] = False
    index = torch.full((VOCAB_SIZE,), -100, dtype=torch.long)
    index[live] = torch.arange(len(live))
    return live, unused, index


def _optimizer(params: list[Any], opts: TinyOptions) -> tuple[Any, Any]:
    """AdamW with a linear warm-up over the first 5% of the steps, then a cosine decay."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=opts.pretrain_lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps, warm = opts.pretrain_steps, max(1, opts.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(steps, 1))))
    )
    return optimizer, schedule


def _padded(batch: list[list[int]]) -> tuple[Any, Any]:
    """Right-padded ids (with <|endoftext|>) and the attention mask of `batch`."""
    import torch

    width = max(len(seq) for seq in batch)
    ids = torch.full((len(batch), width), SPECIAL_TOKENS["<|endoftext|>"], dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def _figures(
    docs: list[str], seqs: list[list[int]], steps: int, live: int, losses: list[float], t0: float
) -> dict[str, Any]:
    figures = {
        "documents": len(docs),
        "tokens": sum(map(len, seqs)),
        "steps": steps,
        "live_vocab": live,
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
        "seconds": round(time.time() - t0, 1),
    }
    log.info(
        "pretrained on %d documents (%d tokens), %d steps: loss %s -> %s in %.0f s",
        figures["documents"],
        figures["tokens"],
        steps,
        figures["loss_first"],
        figures["loss_last"],
        figures["seconds"],
    )
    return figures
