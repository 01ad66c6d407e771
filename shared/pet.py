"""PET regularisation (docs/design.md "PET regularisation"): a smoothness penalty on the last layer's hidden states.

Second-order difference along the sequence, d2_t = h_t - 2·h_{t+1} + h_{t+2}; the penalty is the mean of d2²
(or of the Huber loss of d2 when ``huber_delta`` > 0) over every hidden unit of every position t where t, t+1
and t+2 are all real tokens. Padding never counts, neither as a term nor in the denominator.

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


def pet_loss(hidden: torch.Tensor, mask: torch.Tensor | None = None, huber_delta: float = 0.0) -> torch.Tensor:
    """PET penalty of hidden states [B, T, D] with an attention mask [B, T] (1 = real token, 0 = padding).

    Returns a float32 scalar; 0 (with a graph) when no position has three real tokens in a row.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden states must be [batch, seq, dim], got shape {tuple(hidden.shape)}")
    h = hidden.float()
    if h.shape[1] < 3:
        return h.sum() * 0.0
    d2 = h[:, :-2] - 2.0 * h[:, 1:-1] + h[:, 2:]
    per = F.huber_loss(d2, torch.zeros_like(d2), reduction="none", delta=huber_delta) if huber_delta > 0 else d2 * d2
    if mask is None:
        return per.mean()
    m = mask.to(torch.bool)
    valid = (m[:, :-2] & m[:, 1:-1] & m[:, 2:]).to(per.dtype)  # [B, T-2]
    count = valid.sum() * per.shape[-1]
    if count == 0:
        return per.sum() * 0.0
    return (per * valid.unsqueeze(-1)).sum() / count


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
