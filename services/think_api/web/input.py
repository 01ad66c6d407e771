"""What every route does with a request before the model sees it: the API key, a bounded body, JSON, validation."""

from __future__ import annotations

import hmac
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from services.think_api.web.errors import ApiError

M = TypeVar("M", bound=BaseModel)


def check_key(request: Request, key: str | None) -> None:
    """`Authorization: Bearer <key>` (what OpenAI clients send) or `X-API-Key: <key>`; nothing when no key is set."""
    if not key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(declared) > limit:
            raise ApiError(413, "request_too_large", f"request body over {limit} bytes")
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"request body over {limit} bytes")
        body.append(chunk)
    return b"".join(body)


def validate_json(raw: bytes, model: type[M]) -> M:
    """The body as `model`; errors name fields and rules, never echo the input back."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        fields = [{"field": ".".join(str(p) for p in e["loc"]) or "<body>", "message": e["msg"]} for e in err.errors()]
        first = f"{fields[0]['field']}: {fields[0]['message']}"
        raise ApiError(422, "invalid_request", f"the request does not validate ({first})", fields) from None
