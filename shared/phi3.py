"""Facts about Phi-3 that several stages check.

- The linear layers LoRA may target (the trainer's config check and the baker's adapter check). Phi-3 fuses q/k/v
  into qkv_proj and gate/up into gate_up_proj: the prototype's q_proj/v_proj/... matched nothing.
- What a tensor name of a non-stock model looks like, in Hugging Face (`model.layers.0.self_attn.so8t_gate.A`) and
  GGUF (`blk.0.…`) spelling alike: SO(8) gate parameters, LoRA leftovers, rotations. The baker refuses to save
  such a tensor and the converter refuses a GGUF that has one. (`gate_up_proj` is stock: a whole word is needed.)
"""

from __future__ import annotations

import re

LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
NON_STOCK_TENSOR = re.compile(r"so8|lora|(^|\.)gates?(\.|$)|rotation", re.IGNORECASE)
