"""PET regularisation (docs/design.md "PET regularisation"): a smoothness penalty on the last layer's hidden states.

Second-order difference along the sequence, d2_t = h_t - 2·h_{t+1} + h_{t+2}; the penalty is the mean of d2²
(or of the Huber loss of d2 when ``huber_delta`` > 0) over every hidden unit of every position t where t, t+1
and t+2 are all real tokens of the same sequence. Padding never counts, neither as a term nor in the denominator,
and in a packed row (several records one after another) no difference spans two records: the mask may carry a
sequence id per position (0 = padding), and a triple counts only when its three ids are equal and non-zero.

`pet_loss` is the mean over every valid triple of a batch; `pet_sequence_sum` is the sum over the sequences of
each one's own mean, so a trainer that divides it by the number of sequences gets the same value however the
sequences are batched or packed.

Its weight λ follows a three-phase schedule by training progress: exploration (first 20%: 0.01), transition
(next 40%: 0.05), stabilisation (last 40%: 0.1). Phase boundaries are computed with exact fractions, so with
100 steps step 19 is exploration and step 20 transition, step 59 transition and step 60 stabilisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F


def _terms(hidden: torch.Tensor, huber_delta: float) -> torch.Tensor:
    """Per-position penalty summed over the hidden units: [B, T-2] (float32)."""
    h = hidden.float()
    d2 = h[:, :-2] - 2.0 * h[:, 1:-1] + h[:, 2:]
    if huber_delta > 0:
        per = F.huber_loss(d2, torch.zeros_like(d2), reduction="none", delta=huber_delta)
    else:
        per = d2 * d2
    return per.sum(-1)


def valid_triples(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask (0/False = padding; otherwise 1/True or a sequence id) -> [B, T-2] bool: t, t+1, t+2 are real
    tokens of one sequence."""
    m = mask.long()
    same = (m[:, :-2] == m[:, 1:-1]) & (m[:, 1:-1] == m[:, 2:])
    return same & (m[:, :-2] != 0)


def _check(hidden: torch.Tensor) -> None:
    if hidden.ndim != 3:
        raise ValueError(f"hidden states must be [batch, seq, dim], got shape {tuple(hidden.shape)}")


def pet_loss(hidden: torch.Tensor, mask: torch.Tensor | None = None, huber_delta: float = 0.0) -> torch.Tensor:
    """PET penalty of hidden states [B, T, D]: the mean over every valid triple of the batch and every hidden unit.

    `mask` [B, T]: 1 = real token, 0 = padding, or a sequence id per position for packed rows (see the module
    docstring). Returns a float32 scalar; 0 (with a graph) when no position has three real tokens in a row.
    """
    _check(hidden)
    if hidden.shape[1] < 3:
        return hidden.float().sum() * 0.0
    per = _terms(hidden, huber_delta)
    if mask is None:
        return per.mean() / hidden.shape[-1]
    valid = valid_triples(mask).to(per.dtype)
    count = valid.sum() * hidden.shape[-1]
    if count == 0:
        return per.sum() * 0.0
    return (per * valid).sum() / count


def pet_sequence_sum(hidden: torch.Tensor, segments: torch.Tensor, huber_delta: float = 0.0) -> torch.Tensor:
    """Σ over the sequences of a batch of each sequence's mean PET penalty (float32 scalar with a graph).

    `segments` [B, T]: 0 = padding, s > 0 = the position belongs to sequence s (ids unique within the batch, so a
    row may hold several sequences). A sequence shorter than three tokens has no term and adds nothing.
    """
    _check(hidden)
    if hidden.shape[1] < 3:
        return hidden.float().sum() * 0.0
    per = _terms(hidden, huber_delta)
    valid = valid_triples(segments)
    ids = torch.where(valid, segments[:, :-2].long(), 0)
    counts = torch.bincount(ids.flatten(), minlength=int(segments.max()) + 1).to(per.dtype)
    counts[0] = 0
    weight = torch.where(valid, 1.0 / (counts[ids].clamp_min(1) * hidden.shape[-1]), 0.0)
    return (per * weight).sum()


@dataclass(frozen=True)
class Phase:
    name: str
    fraction: float  # share of the total steps
    weight: float  # λ during the phase


# The prototype's schedule: 20% exploration, 40% transition, 40% stabilisation.
DEFAULT_PHASES = (Phase("exploration", 0.2, 0.01), Phase("transition", 0.4, 0.05), Phase("stabilisation", 0.4, 0.1))


class PetSchedule:
    """λ(step) for optimizer steps 0 … total-1; phase i covers progress in [sum of fractions before i, … + f_i)."""

    def __init__(self, total_steps: int, phases: Sequence[Phase] = DEFAULT_PHASES):
        if total_steps <= 0:
            raise ValueError("total_steps must be positive")
        if not phases:
            raise ValueError("at least one PET phase is needed")
        fracs = [Fraction(str(p.fraction)) for p in phases]  # '0.2' -> 1/5 exactly, no float drift
        if any(f <= 0 for f in fracs) or sum(fracs) != 1:
            raise ValueError(f"PET phase fractions must be positive and sum to 1, got {[p.fraction for p in phases]}")
        self.total = total_steps
        self.phases = tuple(phases)
        self._ends = []
        acc = Fraction(0)
        for f in fracs:
            acc += f
            self._ends.append(acc)

    def phase_index(self, step: int) -> int:
        """Index of the phase that optimizer step `step` (0-based) belongs to: the first with step/total < end."""
        for i, end in enumerate(self._ends):
            if step * end.denominator < end.numerator * self.total:  # step / total < end, in integers
                return i
        return len(self.phases) - 1

    def phase(self, step: int) -> Phase:
        return self.phases[self.phase_index(step)]

    def weight(self, step: int) -> float:
        return self.phase(step).weight

    def boundaries(self) -> list[int]:
        """First step of each phase after the first (e.g. [20, 60] for 100 steps)."""
        out = []
        for i in range(1, len(self.phases)):
            end = self._ends[i - 1]
            out.append(-(-end.numerator * self.total // end.denominator))  # ceil(end * total)
        return out
