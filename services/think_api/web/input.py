"""What every route does with a request before the model sees it: the API key, a bounded body, JSON, validation."""

from __future__ import annotations

import hmac
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from services.think_api.web.errors import ApiError

M = TypeVar("M", bound=BaseModel)
MAX_DEPTH = 16  # arrays and objects inside one another: a chat request needs 5
MAX_FIELDS = 5  # field errors reported (a union that fails reports one per branch: not all of them)
MAX_MESSAGE = 160  # characters of one field error's message


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


def _too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True if arrays and objects nest deeper than `limit` (brackets inside strings do not count); linear, and
    before the parser, which would recurse once per level."""
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def _field_errors(err: ValidationError) -> list[dict]:
    """The first MAX_FIELDS errors, each message capped: an error body stays small whatever the request."""
    return [
        {"field": ".".join(str(p) for p in e["loc"])[:MAX_MESSAGE] or "<body>", "message": e["msg"][:MAX_MESSAGE]}
        for e in err.errors(include_url=False, include_input=False)[:MAX_FIELDS]
    ]


def validate_json(raw: bytes, model: type[M]) -> M:
    """The body as `model`; errors name fields and rules, never echo the input back."""
    if _too_deep(raw):
        raise ApiError(400, "json_too_deep", f"the body nests arrays and objects over {MAX_DEPTH} levels deep")
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        fields = _field_errors(err)
        first = f"{fields[0]['field']}: {fields[0]['message']}"
        raise ApiError(422, "invalid_request", f"the request does not validate ({first})", fields) from None
