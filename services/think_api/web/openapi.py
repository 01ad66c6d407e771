"""The schema FastAPI publishes, completed: the routes read their bodies themselves (to bound their size before
parsing), so their request models are declared here, and the stream's event model is added to the components."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref(model)}}}}


WHY = {
    400: "invalid or too deeply nested JSON, a field that does not validate or is not supported, a chat-template "
    "token in the prompt, a Host the server does not answer to",
    401: "missing or wrong API key",
    404: "not the model served here",
    413: "request body over the limit",
    415: "the body is not JSON (Content-Type: application/json)",
    422: "a field that does not validate; the prompt or max_tokens over the limit",
    500: "internal error",
    502: "the backend failed (HTTP errors, a body that is not a generation)",
    503: "the backend or the audit log is unavailable",
    504: "the backend did not answer in time",
}


def error_responses(model: type[BaseModel], *codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": model, "description": WHY[code]} for code in codes}


def one_of(description: str, *models: type[BaseModel]) -> dict[str, Any]:
    """A response that is one of `models` (each published elsewhere in the schema)."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"anyOf": [ref(m) for m in models]}}},
    }


def install(app: FastAPI, requests: list[type[BaseModel]], extra: list[type[BaseModel]]) -> None:
    """Publish `requests` (validation view) and `extra` (serialization view) under components.schemas."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            pairs = [(m, "validation") for m in requests] + [(m, "serialization") for m in extra]
            _, defs = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            _drop_path_validation(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _drop_path_validation(doc: dict[str, Any]) -> None:
    """FastAPI documents a 422 for every route with a path parameter; a string path parameter cannot fail."""
    for ops in doc["paths"].values():
        for op in ops.values():
            schema = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
            if schema.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del op["responses"]["422"]
    if "HTTPValidationError" not in str(doc["paths"]):
        for name in ("HTTPValidationError", "ValidationError"):
            doc["components"]["schemas"].pop(name, None)
