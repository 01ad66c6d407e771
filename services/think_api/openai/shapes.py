"""A gate decision and a backend's generation in the shapes of the OpenAI protocol (routes.py, stream.py)."""

from __future__ import annotations

from typing import Any

from services.think_api import gate
from services.think_api.backends.protocol import Generation
from services.think_api.openai.models import ChatError, ChatErrorBody, FinishReason, So8tInfo, Usage


def so8t_info(d: gate.Decision, request_id: str) -> So8tInfo:
    return So8tInfo(
        safety_label=d.label,
        escalated=d.escalated,
        status=d.status,
        internal_reasoning_hash=d.thinking_hmac,
        request_id=request_id,
        detail=d.reason,
    )


def usage(gen: Generation) -> Usage:
    prompt, completion = gen.prompt_tokens or 0, gen.completion_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish_reason(gen: Generation) -> FinishReason:
    return "length" if gen.finish_reason == "length" else "stop"


def withheld_body(d: gate.Decision, request_id: str) -> dict[str, Any]:
    err = ChatError(message=gate.WITHHELD, type="server_error", param=None, code="withheld")
    return ChatErrorBody(error=err, request_id=request_id, so8t=so8t_info(d, request_id)).model_dump()
