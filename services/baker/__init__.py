"""Baker: merge the LoRA adapter and fold the SO(8) rotations into o_proj, producing a stock Phi3ForCausalLM."""
