"""Phi-3's linear layer names that LoRA may target, for the trainer's config check and the baker's adapter check.
(Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the prototype's q_proj/v_proj/... matched nothing.)"""
from __future__ import annotations

LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
