"""Label scores: the probability a model gives each of the four labels at its verdict, so a user can read a
per-label ROC AUC and choose a threshold instead of taking the greedy verdict.

For each record the prefix is the prompt plus the model's own reply up to the label of its last verdict line
(`判定: ` / `Verdict: `); a reply without one gets the canonical start of a simple-format thinking
(`# 思考ステップ\\n判定: `, `Verdict: ` for an ASCII request). The score of a label is the teacher-forced
probability of its tokens after that prefix (models.Generator.logprobs). The four labels' texts differ in their
characters, so their token tails are no prefix of one another: the four probabilities are of disjoint
continuations and sum to at most 1 (the rest is the model writing anything else there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from shared.think_format import LABELS, THINK_HEADING

_VERDICT_AT = re.compile(r"^(?:判定|Verdict)\s*[:：]\s*(?=(?:ALLOW|ESCALATION|DENY|REFUSE)\s*$)", re.MULTILINE)


def verdict_prefix(reply: str, user: str) -> str:
    """The reply up to the label of its last verdict line, or the canonical thinking start with a verdict word."""
    found = list(_VERDICT_AT.finditer(reply))
    if found:
        return reply[: found[-1].end()]
    return f"{THINK_HEADING}\n{'Verdict' if user.isascii() else '判定'}: "


def label_scores(gen: Any, prompt: str, reply: str, user: str) -> dict[str, float] | None:
    """{label: probability} from `gen` (a models.Generator), None where the model gives no probabilities."""
    prefix = prompt + verdict_prefix(reply, user)
    lps = gen.logprobs([prefix + label for label in LABELS])
    return None if lps is None else {label: round(math.exp(lp), 6) for label, lp in zip(LABELS, lps)}


def summary(scores: Sequence[dict[str, float] | None], labels: Sequence[str]) -> dict[str, Any] | None:
    """Per label: ROC AUC one-vs-rest (scikit-learn; None when the split lacks positives or negatives), the mean
    score on records of that label and on the others; and the mean total probability of the four labels."""
    from sklearn.metrics import roc_auc_score

    rows = [(s, y) for s, y in zip(scores, labels) if s is not None]
    if not rows:
        return None
    out: dict[str, Any] = {"records": len(rows), "auc": {}, "mean_on_label": {}, "mean_off_label": {}}
    for label in LABELS:
        truth = [y == label for _, y in rows]
        values = [s[label] for s, _ in rows]
        on = [v for v, t in zip(values, truth) if t]
        off = [v for v, t in zip(values, truth) if not t]
        out["auc"][label] = round(float(roc_auc_score(truth, values)), 4) if on and off else None
        out["mean_on_label"][label] = round(sum(on) / len(on), 4) if on else None
        out["mean_off_label"][label] = round(sum(off) / len(off), 4) if off else None
    out["mean_total"] = round(sum(sum(s.values()) for s, _ in rows) / len(rows), 4)
    return out
