"""One forward pass of the training objective: LM loss on assistant tokens, PET, orthogonality.

Wrapped as a module so DDP sees one forward. The LM head runs only on positions that carry a label (the
assistant tokens), not on the whole sequence: same loss, a fraction of the [tokens x vocab] logits.

A padded batch comes with an attention mask; a packed one (services.trainer.data.packed) with `position_ids` that
restart at 0 for each record and no mask, which transformers' Phi-3 turns into block-diagonal attention.
`segments` (0 = padding, s = record s) bounds PET's second differences to one record each.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.trainer.data import IGNORE
from services.trainer.gates import StepRotations, clear_rotations, orthogonality, precompute_rotations
from shared.pet import pet_sequence_sum


class Objective(nn.Module):
    def __init__(self, model: nn.Module, gates: dict, pet_enabled: bool, huber_delta: float):
        super().__init__()
        self.model: Any = model  # the PEFT model (gates are already submodules of it)
        self._gates = dict(gates)  # a plain dict: not registered twice
        self.pet_enabled, self.huber_delta = pet_enabled, huber_delta
        self.step: StepRotations | None = None  # set by the training loop for the forwards of one optimizer step

    @property
    def gates(self) -> dict:
        return self._gates

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ):
        """Returns (sum of token cross-entropies, Σ over records of each record's PET mean, orthogonality, correct
        greedy predictions). Without `segments`, each row of `attention_mask` is one record."""
        causal = self.model.get_base_model()
        R = None
        if self._gates and self.step is not None:
            R = self.step.leaf
        elif self._gates and not torch.is_grad_enabled():
            R = precompute_rotations(self._gates)  # one matrix_exp for every layer (validation, eval)
        elif self._gates:
            # a forward with gradients outside a training step (tests, benches): each gate computes its own R, so
            # reentrant checkpointing, which backpropagates each layer separately, never meets a shared freed graph
            clear_rotations(self._gates)
        hidden = causal.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        picked = targets != IGNORE
        logits = causal.lm_head(hidden[:, :-1][picked]).float()
        wanted = targets[picked]
        lm_sum = F.cross_entropy(logits, wanted, reduction="sum")
        correct = (logits.detach().argmax(-1) == wanted).sum()
        zero = hidden.new_zeros((), dtype=torch.float32)
        pet = zero
        if self.pet_enabled:
            if segments is None:
                rows = torch.arange(1, input_ids.shape[0] + 1, device=input_ids.device).unsqueeze(1)
                assert attention_mask is not None, "a padded batch has a mask, a packed one segments"
                segments = attention_mask * rows
            pet = pet_sequence_sum(hidden, segments, self.huber_delta)
        # in a training step the loop adds the regulariser once per step (StepRotations.backward)
        ortho = orthogonality(self._gates, R) if self._gates and self.step is None else zero
        return lm_sum, pet, ortho, correct
