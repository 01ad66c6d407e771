"""Where the /think API gets its model replies: an Ollama server, llama.cpp in-process, or (tests only) fixed output.

Every backend takes the prompt already rendered in the Phi-3.5 chat template (shared.think_format.render_chat)
and stops at the template's tokens, so all of them see exactly what the model was trained on. Each can give a
whole reply (`generate`) or stream it as it is generated (`stream`: text pieces, then one Generation).
"""

from services.think_api.fixed_backend import FixedOutputBackend
from services.think_api.generation import Backend, BackendError, Generation, GenRequest, StreamItem
from services.think_api.llamacpp_backend import LlamaCppBackend
from services.think_api.ollama_backend import OllamaBackend

__all__ = [
    "Backend",
    "BackendError",
    "FixedOutputBackend",
    "GenRequest",
    "Generation",
    "LlamaCppBackend",
    "OllamaBackend",
    "StreamItem",
]
