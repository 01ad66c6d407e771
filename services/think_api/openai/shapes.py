"""A gate decision and a backend's generation in the shapes of the OpenAI protocol (chat.py, chat_stream.py)."""

from __future__ import annotations

from typing import Any

from services.think_api import gate
from services.think_api.chat_models import ChatError, ChatErrorBody, So8tInfo, Usage
from services.think_api.generation import Generation


def so8t_info(d: gate.Decision, request_id: str) -> So8tInfo:
    return So8tInfo(
        safety_label=d.label,
        escalated=d.escalated,
        status=d.status,
        internal_reasoning_hash=d.thinking_sha256,
        request_id=request_id,
        detail=d.reason,
    )


def usage(gen: Generation) -> Usage:
    prompt, completion = gen.prompt_tokens or 0, gen.completion_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish_reason(gen: Generation) -> str:
    return "length" if gen.finish_reason == "length" else "stop"


def withheld_body(d: gate.Decision, request_id: str) -> dict[str, Any]:
    err = ChatError(message=gate.WITHHELD, type="server_error", param=None, code="withheld")
    return ChatErrorBody(error=err, request_id=request_id, so8t=so8t_info(d, request_id)).model_dump()
