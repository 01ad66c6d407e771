"""How the server is set up (limits, sampling defaults, the API key), and the bounds every model request obeys."""

from __future__ import annotations

from pydantic import Field

from services.think_api.backends.protocol import GenRequest
from services.think_api.web.errors import ApiError
from shared.config import StrictModel
from shared.think_format import Format, has_template_token


class ServeSettings(StrictModel):
    format: Format = "simple"  # the /think format the model was trained on (its system prompt)
    max_request_bytes: int = Field(64 * 1024, gt=0)
    max_prompt_chars: int = Field(8000, gt=0)  # a chat's messages together
    max_tokens_limit: int = Field(2048, gt=0)
    default_max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0, le=2)  # the prototype's sampling defaults
    top_p: float = Field(0.9, gt=0, le=1)
    api_key: str | None = None
    # a stream waits this long for the backend's first token before it starts (so a backend that is down is an
    # HTTP error, not a stream that fails), then sends an SSE comment after every such silence while the model thinks
    stream_keepalive_s: float = Field(10.0, gt=0)


def check_limits(prompt_chars: int, max_tokens: int | None, texts: list[str], s: ServeSettings) -> None:
    """The bounds every model request obeys, whichever protocol it came in."""
    if prompt_chars > s.max_prompt_chars:
        raise ApiError(422, "prompt_too_long", f"the prompt is over {s.max_prompt_chars} characters")
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise ApiError(422, "max_tokens_too_large", f"max_tokens is over the limit of {s.max_tokens_limit}")
    if any(has_template_token(t) for t in texts):
        raise ApiError(400, "template_token_in_prompt", "the prompt contains a chat-template token (<|...|>)")


def sampling(
    s: ServeSettings,
    prompt: str,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
) -> GenRequest:
    return GenRequest(
        prompt,
        max_tokens or s.default_max_tokens,
        s.temperature if temperature is None else temperature,
        top_p or s.top_p,
        seed,
    )
