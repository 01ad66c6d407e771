"""The OpenAI chat-completions protocol on the /think pipeline: POST /v1/chat/completions, GET /v1/models.

Same backend, gate, audit log and API key as POST /think. `choices[0].message.content` is what /think answers
(its `answer`); the label, the thinking's hash and the request id are in the `so8t` extension. A withheld reply is
an error (HTTP 502, `code: withheld`, `x-should-retry: false`). `stream: true` is in stream.py.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from services.think_api.audit import AuditLog, AuditRecord
from services.think_api.backends import Backend, GenRequest
from services.think_api.openai import stream
from services.think_api.openai.models import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatErrorBody,
    Choice,
    ModelCard,
    ModelList,
)
from services.think_api.openai.shapes import finish_reason, so8t_info, usage, withheld_body
from services.think_api.prompts import render_turns
from services.think_api.replies import audited, generate_gated, new_record, read_body_in_time
from services.think_api.settings import ServeSettings, check_limits, sampling
from services.think_api.web import openapi
from services.think_api.web.errors import ApiError, api_error_response
from services.think_api.web.input import check_key, validate_json

ENDPOINT = "/v1/chat/completions"
OWNER = "so8t"


def _completion_responses() -> dict[int | str, dict[str, Any]]:
    """POST /v1/chat/completions's documented responses (a fresh dict: FastAPI keeps what it is given)."""
    return {
        200: {
            "description": "the answer; with `stream: true`, server-sent events: one `data:` "
            "ChatCompletionChunk each, then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": openapi.ref(ChatCompletionChunk)}},
        },
        502: {
            "model": ChatErrorBody,
            "description": "the reply was withheld (code withheld, with so8t), or " + openapi.WHY[502],
        },
        **openapi.error_responses(ChatErrorBody, 400, 401, 404, 413, 415, 500, 503, 504),
    }


def add_routes(app: FastAPI, backend: Backend, audit: AuditLog, s: ServeSettings) -> None:
    _model_routes(app, backend, s)

    @app.post(
        ENDPOINT,
        response_model=ChatCompletion,
        openapi_extra=openapi.request_body(ChatCompletionRequest),
        responses=_completion_responses(),
    )
    async def completions(request: Request) -> Response:
        row = new_record(backend, ENDPOINT)
        return await audited(audit, row, lambda: _reply(request, row, backend, audit, s), openai=True)


def _model_routes(app: FastAPI, backend: Backend, s: ServeSettings) -> None:
    """GET /v1/models and /v1/models/{id}: the one model served."""
    card = ModelCard(id=backend.model, created=int(time.time()), owned_by=OWNER)

    def keyed(request: Request, model_id: str | None = None) -> Response | None:
        """None when the request may see the model list (or `model_id`); else the error response."""
        try:
            check_key(request, s.api_key)
            if model_id is not None and model_id != backend.model:
                raise ApiError(404, "model_not_found", "no such model here (GET /v1/models)")
        except ApiError as err:
            return api_error_response(err, None, openai=True)
        return None

    @app.get("/v1/models", response_model=ModelList, responses=openapi.error_responses(ChatErrorBody, 401))
    async def models(request: Request) -> Response:
        return keyed(request) or JSONResponse(ModelList(data=[card]).model_dump())

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        responses=openapi.error_responses(ChatErrorBody, 401, 404),
    )
    async def model(request: Request, model_id: str) -> Response:
        return keyed(request, model_id) or JSONResponse(card.model_dump())


def _check_model(req: ChatCompletionRequest, backend: Backend) -> None:
    if req.model != backend.model:  # the name asked for is not echoed back
        raise ApiError(404, "model_not_found", f"this server serves one model, {backend.model!r} (GET /v1/models)")


async def _reply(request: Request, row: AuditRecord, backend: Backend, audit: AuditLog, s: ServeSettings) -> Response:
    """The request read and bounded, then the whole answer, or a stream of it."""
    check_key(request, s.api_key)
    req = validate_json(await read_body_in_time(request, s), ChatCompletionRequest)
    _check_model(req, backend)
    turns = [(m.turn_role, m.text) for m in req.messages]
    texts = [text for _, text in turns]
    row.prompt_chars, row.stream = sum(map(len, texts)), req.stream
    check_limits(row.prompt_chars, req.token_limit, texts, s)
    gen_req = sampling(s, render_turns(turns, s.format), req.token_limit, req.temperature, req.top_p, req.seed)
    gate_prompt = "\n".join(texts)  # what the thinking may restate, and the answer too
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await stream.open_stream(request, backend, audit, s, gen_req, gate_prompt, row, include_usage)
    return await _whole(request, backend, gen_req, gate_prompt, row)


async def _whole(
    request: Request, backend: Backend, gen_req: GenRequest, gate_prompt: str, row: AuditRecord
) -> Response:
    """`stream: false`: one ChatCompletion, or the withheld error."""
    gen, d = await generate_gated(request, backend, gen_req, gate_prompt, row)
    if d.status == "withheld":
        return JSONResponse(withheld_body(d, row.request_id), status_code=502, headers={"x-should-retry": "false"})
    body = ChatCompletion(
        id=f"chatcmpl-{row.request_id}",
        created=int(time.time()),
        model=backend.model,
        choices=[Choice(message=AssistantMessage(content=d.answer), finish_reason=finish_reason(gen))],
        usage=usage(gen),
        so8t=so8t_info(d, row.request_id),
    )
    return JSONResponse(body.model_dump())
