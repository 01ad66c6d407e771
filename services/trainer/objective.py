"""One forward pass of the training objective: LM loss on assistant tokens, PET, orthogonality.

Wrapped as a module so DDP sees one forward. The LM head runs only on positions that carry a label (the
assistant tokens), not on the whole sequence: same loss, a fraction of the [tokens x vocab] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.trainer.data import IGNORE
from services.trainer.gates import orthogonality, precompute_rotations
from shared.pet import pet_loss


class Objective(nn.Module):
    def __init__(self, model: nn.Module, gates: dict, pet_enabled: bool, huber_delta: float):
        super().__init__()
        self.model = model  # the PEFT model (gates are already submodules of it)
        self._gates = dict(gates)  # a plain dict: not registered twice
        self.pet_enabled, self.huber_delta = pet_enabled, huber_delta

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """Returns (sum of token cross-entropies, PET penalty, orthogonality, correct greedy predictions)."""
        causal = self.model.get_base_model()
        R = precompute_rotations(self._gates) if self._gates else None
        hidden = causal.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        picked = targets != IGNORE
        logits = causal.lm_head(hidden[:, :-1][picked]).float()
        wanted = targets[picked]
        lm_sum = F.cross_entropy(logits, wanted, reduction="sum")
        correct = (logits.detach().argmax(-1) == wanted).sum()
        zero = hidden.new_zeros((), dtype=torch.float32)
        pet = pet_loss(hidden, attention_mask, self.huber_delta) if self.pet_enabled else zero
        ortho = orthogonality(self._gates, R) if self._gates else zero
        return lm_sum, pet, ortho, correct
