"""Errors as JSON, never a stack trace: one exception type for the routes, two body shapes.

    /think:  {"error": {"code", "message", "fields"?}, "request_id"}
    /v1/...: {"error": {"message", "type", "param", "code", "fields"?}, "request_id"}   (the OpenAI shape)

The OpenAI shape is the same object with `type` and `param` added, so a client of either reads `error.code`.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ApiError(Exception):
    def __init__(
        self,
        http_status: int,
        code: str,
        message: str,
        fields: list[dict] | None = None,
        retry: bool | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.http_status, self.code, self.message, self.fields = http_status, code, message, fields
        self.retry = retry  # None: let the client decide; False: retrying gives the same answer (x-should-retry)
        self.retry_after = retry_after  # seconds, sent as Retry-After (429: the queue is full)


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[FieldError] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str | None


def openai_type(http_status: int) -> str:
    """The `error.type` an OpenAI client expects for a status."""
    if http_status == 401:
        return "authentication_error"
    if http_status == 404:
        return "not_found_error"
    if http_status == 429:
        return "rate_limit_error"
    return "server_error" if http_status >= 500 else "invalid_request_error"


def error_body(
    http_status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    fields: list[dict] | None = None,
    openai: bool = False,
) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if openai:
        param = fields[0]["field"] if fields else None
        err = {"message": message, "type": openai_type(http_status), "param": param, "code": code}
    if fields:
        err["fields"] = fields
    return {"error": err, "request_id": request_id}


def error_response(
    http_status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    fields: list[dict] | None = None,
    headers: dict | None = None,
    openai: bool = False,
) -> JSONResponse:
    return JSONResponse(
        error_body(http_status, code, message, request_id, fields, openai), status_code=http_status, headers=headers
    )


def api_error_response(err: ApiError, request_id: str | None, openai: bool = False) -> JSONResponse:
    """The response of an ApiError; OpenAI clients get 400 where /think says 422 (a request that does not
    validate), as the OpenAI API does."""
    headers = {"WWW-Authenticate": "Bearer"} if err.http_status == 401 else {}
    if err.retry is not None:
        headers["x-should-retry"] = "true" if err.retry else "false"
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    status = 400 if openai and err.http_status == 422 else err.http_status
    return error_response(status, err.code, err.message, request_id, err.fields, headers or None, openai)
