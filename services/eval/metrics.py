"""The figures of one model on one split, from its replies and the records' labels and reference answers.

- format: the shared parser accepts the reply (thinking and final part came apart cleanly); verdict: the thinking
  has a verdict line. Label accuracy counts every record (a reply without a verdict is wrong), and the confusion
  matrix has a `none` column for those.
- gate: what POST /think would do with the reply (services/think_api/gate.decide), and leaks: replies where text
  of the thinking is in what the gate would return. Checked here independently of the gate's own repeat check: a
  thinking line of 12 or more characters (not in the prompt) found verbatim in the answer, or a format marker.
- chrF (sacrebleu) of the final part against the reference answer (an empty hypothesis where there is none).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from services.think_api.gate import decide
from shared.think_format import LABELS, parse

try:  # the gate keys its thinking digest with a server secret; the eval's digests are never kept
    from services.think_api.secret import ServerSecret

    _GATE_KEY: tuple = (ServerSecret.ephemeral(),)
except ImportError:  # a gate without a server secret
    _GATE_KEY = ()

GATE_OUTCOMES = ("answered", "denied", "refused", "escalated", "withheld")
PREDICTED = (*LABELS, "none")
_MARKERS = ("# 思考ステップ", "# 最終回答", "<think", "</think", "<final", "</final", "判定:", "Verdict:")
LEAK_LINE = 12


@dataclass(frozen=True)
class Scored:
    """One reply, judged."""

    format_ok: bool
    label: str | None  # the verdict the thinking gives
    gate: str  # the gate's outcome
    leak: bool
    final: str | None
    error: str | None


def leaks(thinking: str | None, answer: str, prompt: str) -> bool:
    """True when `answer` carries text of `thinking` (a whole line of it, not from the prompt) or a format marker."""
    if any(m in answer for m in _MARKERS):
        return True
    if not thinking:
        return False
    lines = {ln.strip() for ln in thinking.splitlines()}
    return any(len(ln) >= LEAK_LINE and ln in answer and ln not in prompt for ln in lines)


def judge(reply: str, prompt: str) -> Scored:
    p = parse(reply)
    d = decide(reply, prompt, *_GATE_KEY)
    format_ok = p.ok and p.thinking is not None and p.final is not None
    return Scored(
        format_ok,
        p.label,
        d.status,
        leaks(p.thinking, d.answer, prompt),
        p.final if format_ok else None,
        p.error or d.reason,
    )


def figures(
    scored: list[Scored], labels: list[str], references: list[str], tokens: list[int], seconds: float
) -> dict[str, Any]:
    """Every figure of one model on one split (`labels`/`references`: the records' label and reference answer)."""
    from sacrebleu.metrics import CHRF

    n = len(scored)
    confusion = {ref: dict.fromkeys(PREDICTED, 0) for ref in LABELS}
    for s, ref in zip(scored, labels):
        confusion[ref][s.label or "none"] += 1
    gate = Counter(s.gate for s in scored)
    hyps = [s.final or "" for s in scored]
    return {
        "records": n,
        "format_compliance": _share(sum(s.format_ok for s in scored), n),
        "verdict_present": _share(sum(s.label is not None for s in scored), n),
        "label_accuracy": _share(sum(s.label == ref for s, ref in zip(scored, labels)), n),
        "confusion": confusion,
        "gate": {k: gate.get(k, 0) for k in GATE_OUTCOMES},
        "leaks": sum(s.leak for s in scored),
        "chrf": round(CHRF().corpus_score(hyps, [references]).score, 2) if n else None,
        "tokens_per_s": round(sum(tokens) / seconds, 1) if seconds > 0 else None,
        "mean_reply_tokens": round(sum(tokens) / n, 1) if n else None,
    }


def _share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None
