"""The error responses each group of routes can give, for the OpenAPI schema (clients and fuzzers read it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """Every error on the TGI-style, adapter and operations routes."""

    error: str
    error_type: str
    request_id: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class OpenAIErrorBody(BaseModel):
    """Errors on the OpenAI routes, in the shape the openai client reads."""

    error: OpenAIErrorDetail
    request_id: str | None = None


_WHY = {
    400: "Unreadable body",
    401: "Missing or invalid API key",
    403: "Only an admin key may act for another tenant",
    404: "Unknown adapter",
    413: "Body or adapter too large",
    415: "Unsupported content type",
    422: "Invalid request or adapter",
    424: "Generation failed",
    429: "Overloaded: retry after `Retry-After` seconds",
    503: "Draining, or the adapter store is unavailable",
    507: "The adapter store is full",
}
_GENERATION = (400, 401, 403, 404, 413, 422, 424, 429, 503)


def error_responses(codes: tuple[int, ...], model: type[BaseModel] = ErrorBody) -> dict[int | str, Any]:
    return {code: {"model": model, "description": _WHY[code]} for code in codes}


GENERATION_ERRORS = error_responses(_GENERATION)
OPENAI_ERRORS = error_responses(_GENERATION, OpenAIErrorBody)
ADAPTER_ERRORS = error_responses((400, 401, 403, 404, 413, 415, 422, 503, 507))
ADMIN_ERRORS = error_responses((401, 403, 422))  # 422: an admin key's X-Tenant that is not a valid tenant
_EVENT = {  # one Server-Sent Event: its `data` is a JSON chunk (or `[DONE]` on the OpenAI routes)
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
EVENT_STREAM = {200: {"content": {"text/event-stream": {"schema": _EVENT}}}}
