"""The FastAPI application: wiring, request ids, lifespan of the engine."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from prefixserve import __version__
from prefixserve.api import routes_adapters, routes_generate, routes_ops
from prefixserve.api.errors import install_error_handlers
from prefixserve.api.generation import DEFAULT_NAMESPACE
from prefixserve.runtime import Runtime

log = logging.getLogger("prefixserve.access")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class ServerState:
    """What the routes need: the engine, the adapter registry and store, settings. No tensors."""

    def __init__(self, runtime: Runtime) -> None:
        self.settings = runtime.settings
        self.loaded = runtime.loaded
        self.engine = runtime.engine
        self.registry = runtime.registry
        self.store = runtime.store
        self.model_name = runtime.settings.model_name or runtime.loaded.name
        self.draining = False

    def namespace(self, request: Request) -> str:
        return DEFAULT_NAMESPACE


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.engine.start()
        yield
        runtime.engine.stop_accepting()
        runtime.engine.cancel_all()
        runtime.engine.join(timeout=10)

    app = FastAPI(
        title="prefixserve",
        version=__version__,
        description="Serve PEFT prefix-tuning adapters on one frozen base model, batched across adapters.",
        lifespan=lifespan,
    )
    app.state.server = ServerState(runtime)
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
        request.state.request_id = rid
        response = await call_next(request)
        response.headers["X-Request-Id"] = rid
        log.info(
            "%s %s -> %d", request.method, request.url.path, response.status_code, extra={"request_id": rid}
        )
        return response

    app.include_router(routes_ops.router)
    app.include_router(routes_generate.router)
    app.include_router(routes_adapters.router)
    return app
