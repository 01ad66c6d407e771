"""The trainer stage: QLoRA + SO(8) rotation gates + PET, resumable after power loss at any instant."""
