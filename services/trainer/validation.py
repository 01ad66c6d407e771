"""Validation during training: mean LM loss on the assistant tokens of val.jsonl, every `eval_steps` and at the end.

It runs under the training forwards' autocast (the same numeric regime as the training loss beside it).
It changes nothing about the trajectory: no gradient, dropout off for the pass (each module's mode restored after),
and every RNG state (Python, NumPy, torch, CUDA) put back, so a run with validation ends with the same weights as
one without, and exact resume stays bitwise. The history travels in each checkpoint, so `best` survives a resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.trainer import checkpoint, data
from services.trainer.gates import clear_rotations
from services.trainer.objective import Objective


@dataclass
class Validation:
    data: data.Dataset
    every: int
    pad_id: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # the training forwards'
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"step", "lm"}], in step order

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def run(self, objective: Objective, step: int) -> dict[str, Any]:
        """The mean LM loss at `step` (objective: the unwrapped Objective, the same forward as training)."""
        rng = checkpoint.rng_state()
        modes = [(m, m.training) for m in objective.modules()]
        objective.eval()
        total, targets = 0.0, 0
        try:
            with torch.no_grad(), self.autocast():
                for ex in self.data.examples:
                    ids, mask, labels = (t.to(self.device) for t in data.collate([ex], self.pad_id))
                    lm_sum, *_ = objective(ids, mask, labels)
                    total += float(lm_sum)
                    targets += ex.n_targets
        finally:
            for m, was in modes:
                m.training = was
            checkpoint.set_rng_state(rng)
            clear_rotations(objective.gates)  # computed for this pass only
        point = {"step": step, "lm": total / max(targets, 1)}
        self.history = [h for h in self.history if h["step"] < step] + [point]
        return point

    def summary(self) -> dict[str, Any] | None:
        """For the final manifest: records and tokens evaluated, the last and the best point, the history."""
        if not self.history:
            return None
        return {
            "dataset": str(self.data.path),
            "records": len(self.data.examples),
            "tokens": sum(ex.n_targets for ex in self.data.examples),
            "every": self.every,
            "last": self.history[-1],
            "best": min(self.history, key=lambda h: (h["lm"], h["step"])),
            "history": self.history,
        }
