"""Where the /think API gets its model replies: an Ollama server, llama.cpp in-process, or (tests only) fixed output.

Every backend takes the prompt already rendered in the Phi-3.5 chat template (shared.think_format.render_chat)
and stops at the template's tokens, so all of them see exactly what the model was trained on. Each can give a
whole reply (`generate`) or stream it as it is generated (`stream`: text pieces, then one Generation); the
contract is protocol.py, and pump.py runs a stream in a thread of its own for the event loop. A new backend is one
module here that satisfies `Backend`.
"""

from services.think_api.backends.fixed import FixedOutputBackend
from services.think_api.backends.llamacpp import LlamaCppBackend
from services.think_api.backends.ollama import OllamaBackend
from services.think_api.backends.protocol import Backend, BackendError, Generation, GenRequest, StreamItem

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
