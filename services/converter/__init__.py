"""Converter: baked Phi-3 -> GGUF F16 (llama.cpp's convert_hf_to_gguf.py), Q8_0 and Q4_K_M (llama.cpp's quantiser),
each file checked by reading its header and running it in llama.cpp against the HF model."""
