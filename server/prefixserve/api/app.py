"""The FastAPI application: wiring, authentication, request ids, lifespan of the engine, drain."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixserve import __version__, metrics
from prefixserve.api import routes_adapters, routes_generate, routes_openai, routes_ops
from prefixserve.api.auth import Authenticator, KeyRing, Principal
from prefixserve.api.errors import APIError, install_error_handlers
from prefixserve.api.generation import TenantLimiter
from prefixserve.runtime import Runtime

log = logging.getLogger("prefixserve.access")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class ServerState:
    """What the routes need: the engine, the adapter registry and store, settings. No tensors."""

    def __init__(self, runtime: Runtime, keyring: KeyRing | None) -> None:
        self.settings = runtime.settings
        self.loaded = runtime.loaded
        self.engine = runtime.engine
        self.registry = runtime.registry
        self.store = runtime.store
        self.model_name = runtime.settings.model_name or runtime.loaded.name
        self.authenticator = Authenticator(keyring)
        self.limiter = TenantLimiter(runtime.settings.max_concurrent_per_tenant)
        self.started_at = time.time()
        self.draining = False

    def namespace(self, request: Request) -> str:
        return request.state.principal.tenant

    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    async def aencode(self, text: str) -> list[int]:
        """Tokenize off the event loop: a long prompt must not stall every other request."""
        return await run_in_threadpool(self.encode, text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if not tokenizer.chat_template:
            raise APIError(
                422,
                f"the base model {self.model_name!r} has no chat template; use /v1/completions or /generate",
                "validation",
            )
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    async def drain(self) -> None:
        """Stop taking requests (/ready → 503), let running ones finish within the grace period."""
        self.draining = True
        log.info(
            "draining: waiting up to %.0fs for %d running, %d waiting requests",
            self.settings.drain_seconds,
            self.engine.num_running,
            self.engine.num_waiting,
        )
        deadline = time.monotonic() + self.settings.drain_seconds
        while (self.engine.num_running or self.engine.num_waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.engine.stop_accepting()
        if self.engine.num_running or self.engine.num_waiting:
            log.warning("drain grace period over: cancelling the requests still running")
            self.engine.cancel_all()


class RequestIdMiddleware:
    """Gives every request an id (the client's `X-Request-Id` if sane), echoed in the response and the log.

    Pure ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides client disconnects
    from the endpoint, and a disconnect must free the request's batch row.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status, start = 0, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s -> %d in %.1f ms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1e3,
                extra={"request_id": rid},
            )


class BodyLimitMiddleware:
    """Refuse a request whose declared body is larger than any endpoint accepts, before reading it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                message = (
                    f"request body is {int(declared) / 2**20:.1f} MB, above this server's limit of "
                    f"{self.max_bytes / 2**20:.1f} MB"
                )
                response = JSONResponse({"error": message, "error_type": "too_large"}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def get_principal(request: Request) -> Principal:
    principal = request.app.state.server.authenticator(request)
    request.state.principal = principal
    return principal


def create_app(runtime: Runtime, keyring: KeyRing | None = None, start_engine: bool = True) -> FastAPI:
    """With `start_engine=False` the caller runs the engine's loop itself (the server: on the main thread)."""
    state = ServerState(runtime, keyring)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            runtime.engine.start()
        yield
        runtime.engine.stop_accepting()
        runtime.engine.cancel_all()
        await asyncio.to_thread(runtime.engine.join, 10)

    app = FastAPI(
        title="prefixserve",
        version=__version__,
        description="Serve PEFT prefix-tuning adapters on one frozen base model, batched across adapters. "
        "Authenticate with `Authorization: Bearer <key>` when the server has API keys.",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    metrics.register_adapter_info(
        metrics.AdapterInfoCollector(
            runtime.engine.running_adapters,
            runtime.engine.waiting_adapters,
            runtime.settings.max_batch_size,
            redact=keyring is not None,
        )
    )

    app.add_middleware(
        BodyLimitMiddleware, max_bytes=max(16 << 20, int(runtime.settings.max_adapter_mb * 2**20) + (1 << 20))
    )
    app.add_middleware(RequestIdMiddleware)

    authenticated = [Depends(get_principal)]
    app.include_router(routes_ops.router)
    app.include_router(routes_generate.router, dependencies=authenticated)
    app.include_router(routes_openai.router, dependencies=authenticated)
    app.include_router(routes_adapters.router, dependencies=authenticated)
    return app
