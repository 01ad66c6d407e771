"""Validation during training: mean LM loss on the assistant tokens of val.jsonl, every `eval_steps` and at the end;
and, on the first `eval_generate_records` of those records, a greedy reply each: the share in the /think format
(the shared parser accepts it) and the share whose verdict is the record's label (read from its reference answer).

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
from services.trainer.gates import clear_rotations, precompute_rotations
from services.trainer.objective import Objective
from shared.think_format import STOP_TOKENS, parse


@dataclass
class Validation:
    data: data.Dataset
    every: int
    pad_id: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # the training forwards'
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"step", "lm", ...}], in step order
    tokenizer: Any = None  # for the replies (generate_records > 0)
    generate_records: int = 0  # train.eval_generate_records: replies generated per validation
    generate_tokens: int = 256  # train.eval_generate_tokens: the longest reply

    def samples(self) -> list[tuple[list[int], str | None]]:
        """(prompt ids, the reference answer's verdict) of the first `generate_records` records."""
        out: list[tuple[list[int], str | None]] = []
        for ex in self.data.examples[: self.generate_records]:
            start = next(i for i, t in enumerate(ex.labels) if t != data.IGNORE)
            reference = self.tokenizer.decode([t for t in ex.labels if t != data.IGNORE], skip_special_tokens=False)
            out.append((ex.input_ids[:start], parse(reference).label))
        return out

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def run(self, objective: Objective, step: int) -> dict[str, Any]:
        """The mean LM loss at `step` (objective: the unwrapped Objective, the same forward as training)."""
        rng = checkpoint.rng_state()
        modes = [(m, m.training) for m in objective.modules()]
        objective.eval()
        total, targets, replies = 0.0, 0, {}
        try:
            with torch.no_grad(), self.autocast():
                for ex in self.data.examples:
                    ids, mask, labels = (t.to(self.device) for t in data.collate([ex], self.pad_id))
                    lm_sum, *_ = objective(ids, mask, labels)
                    total += float(lm_sum)
                    targets += ex.n_targets
                if self.generate_records:
                    replies = self.generate(objective)
        finally:
            for m, was in modes:
                m.training = was
            checkpoint.set_rng_state(rng)
            clear_rotations(objective.gates)  # computed for this pass only
        point = {"step": step, "lm": total / max(targets, 1), **replies}
        self.history = [h for h in self.history if h["step"] < step] + [point]
        return point

    def generate(self, objective: Objective) -> dict[str, Any]:
        """Greedy replies to the sample's prompts (the gated model, no gradient): format and verdict shares."""
        causal = objective.model.get_base_model()
        stops = [i for i in (self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS) if isinstance(i, int)]
        precompute_rotations(objective.gates)
        fmt = right = 0
        samples = self.samples()
        for prompt, label in samples:
            ids = torch.tensor([prompt], device=self.device)
            out = causal.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.generate_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=self.pad_id,
            )
            new = out[0, len(prompt) :].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
            p = parse(self.tokenizer.decode(new, skip_special_tokens=False))
            fmt += p.ok
            right += p.label is not None and p.label == label
        n = len(samples)
        return {"generated": n, "format": round(fmt / n, 4), "label_accuracy": round(right / n, 4)}

    def summary(self) -> dict[str, Any] | None:
        """For the final manifest: records and tokens evaluated, the last and the best point, the history."""
        if not self.history:
            return None
        return {
            "dataset": str(self.data.path),
            "records": len(self.data.examples),
            "tokens": sum(ex.n_targets for ex in self.data.examples),
            "every": self.every,
            "generate_records": min(self.generate_records, len(self.data.examples)),
            "last": self.history[-1],
            "best": min(self.history, key=lambda h: (h["lm"], h["step"])),
            "history": self.history,
        }
