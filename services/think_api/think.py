"""POST /think: prompt in, final answer out (and the four-class label when present), thinking never.

   {"prompt": "...", "max_tokens": 512, "temperature": 0.7, "top_p": 0.9, "seed": 1}
   (the prototype's fields work too: "query", "max_new_tokens", "user_id")
-> {"answer", "safety_label", "escalated", "internal_reasoning_hash", "request_id", "status", "model", "detail"}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.think_api.audit import AuditLog, AuditRecord
from services.think_api.backends import Backend
from services.think_api.prompts import build_prompt
from services.think_api.replies import audited, generate_gated, new_record, read_body_in_time
from services.think_api.settings import ServeSettings, check_limits, sampling
from services.think_api.web import openapi
from services.think_api.web.errors import ErrorBody
from services.think_api.web.input import check_key, validate_json

ENDPOINT = "/think"


class ThinkRequest(BaseModel):
    """`prompt` (or the prototype's `query`); `max_tokens` (or `max_new_tokens`). `user_id` is accepted from the
    prototype's clients and not stored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1)
    query: str | None = Field(None, min_length=1)
    user_id: str | None = Field(None, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _one_of_each(self) -> ThinkRequest:
        if (self.prompt is None) == (self.query is None):
            raise ValueError("give exactly one of 'prompt' or 'query'")
        if self.max_tokens is not None and self.max_new_tokens is not None:
            raise ValueError("give at most one of 'max_tokens' or 'max_new_tokens'")
        return self

    @property
    def text(self) -> str:
        return self.prompt if self.prompt is not None else self.query  # type: ignore[return-value]


class ThinkResponse(BaseModel):
    answer: str
    safety_label: str | None
    escalated: bool
    # HMAC-SHA256 of the thinking under the server secret (links the response to its audit row); null when the reply
    # did not parse
    internal_reasoning_hash: str | None
    request_id: str
    status: str  # answered | denied | refused | escalated | withheld
    model: str
    detail: str | None = None  # why a reply was withheld


def _responses() -> dict[int | str, dict[str, Any]]:
    """The route's documented responses besides 200 (a fresh dict: FastAPI keeps what it is given)."""
    return {
        502: openapi.one_of(
            "the reply was withheld (ThinkResponse, status withheld), or " + openapi.WHY[502],
            ThinkResponse,
            ErrorBody,
        ),
        **openapi.error_responses(ErrorBody, 400, 401, 413, 415, 422, 500, 503, 504),
    }


def add_routes(app: FastAPI, backend: Backend, audit: AuditLog, s: ServeSettings) -> None:
    @app.post(
        ENDPOINT,
        response_model=ThinkResponse,
        openapi_extra=openapi.request_body(ThinkRequest),
        responses=_responses(),
    )
    async def think(request: Request) -> Response:
        row = new_record(backend, ENDPOINT)
        return await audited(audit, row, lambda: _reply(request, row, backend, s))


async def _reply(request: Request, row: AuditRecord, backend: Backend, s: ServeSettings) -> Response:
    check_key(request, s.api_key)
    req = validate_json(await read_body_in_time(request, s), ThinkRequest)
    row.prompt_chars = len(req.text)
    max_tokens = req.max_tokens or req.max_new_tokens
    check_limits(len(req.text), max_tokens, [req.text], s)
    gen_req = sampling(s, build_prompt(req.text, s.format), max_tokens, req.temperature, req.top_p, req.seed)
    _, d = await generate_gated(request, backend, gen_req, req.text, row)
    body = ThinkResponse(
        answer=d.answer,
        safety_label=d.label,
        escalated=d.escalated,
        internal_reasoning_hash=d.thinking_hmac,
        request_id=row.request_id,
        status=d.status,
        model=backend.model,
        detail=d.reason,
    )
    return JSONResponse(body.model_dump(), status_code=d.http_status)
