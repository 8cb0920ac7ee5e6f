"""Every error leaves as `{"error": str, "error_type": str}` with TGI's status codes, and no stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixserve import metrics
from prefixserve.adapters.errors import (
    AdapterError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    StoreError,
    StoreFullError,
)
from prefixserve.api.field_names import worded
from prefixserve.engine.errors import EngineError, EngineStoppedError, QueueFullError, RequestValidationError

log = logging.getLogger(__name__)
_VLLM_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})


def is_openai_path(path: str) -> bool:
    """Routes whose clients (openai, LangChain, vLLM's tools) read errors in OpenAI's shape: every /v1/ path
    but prefixserve's own adapter API, unknown ones included."""
    return (path.startswith("/v1/") and not path.startswith("/v1/adapters")) or path in _VLLM_PATHS


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,  # the request field at fault, where one is
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers
        self.param = param


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """`param`: the request field at fault, where known (OpenAI's shape has a place for it)."""
    metrics.REQUEST_FAILURE.labels(error_type).inc()
    request.state.error = (error_type, message)  # for the request's trace span, when tracing is on
    body: dict[str, object] = {"error": message, "error_type": error_type}
    if is_openai_path(request.url.path):  # what the openai client reads its error message from
        body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    rid = getattr(request.state, "request_id", None)
    if rid:  # also set here: responses built outside the request-id middleware (500s) carry it too
        body["request_id"] = rid
        headers = {**(headers or {}), "X-Request-Id": rid}
    return JSONResponse(body, status_code=status, headers=headers)


def status_for(exc: Exception) -> int:
    if isinstance(exc, AdapterNotFoundError):
        return 404
    if isinstance(exc, AdapterTooLargeError):
        return 413
    if isinstance(exc, StoreFullError):
        return 507
    if isinstance(exc, StoreError):
        return 503
    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, EngineStoppedError):
        return 503
    return 422


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.error_type, exc.headers, exc.param)

    @app.exception_handler(AdapterError)
    @app.exception_handler(EngineError)
    async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        message, param = str(exc), None
        if isinstance(exc, RequestValidationError):
            message, param = worded(exc, is_openai_path(request.url.path))
        return error_response(request, status, message, getattr(exc, "error_type", "error"), headers, param)

    @app.exception_handler(FastAPIValidationError)
    async def _validation_error(request: Request, exc: FastAPIValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(request, 422, "; ".join(problems) or "invalid request", "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            request, exc.status_code, str(exc.detail), getattr(exc, "error_type", "http"), exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "unhandled error on %s %s",
            request.method,
            request.url.path,
            extra={"request_id": getattr(request.state, "request_id", None)},
        )
        return error_response(
            request, 500, "internal server error; the request id is in the server log", "internal"
        )
