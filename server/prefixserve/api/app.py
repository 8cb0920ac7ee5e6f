"""The FastAPI application's wiring: routers, middleware (request ids, authentication, body limits, tracing),
error handlers, live metrics, and the engine's lifespan. What the routes share is `state.ServerState`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.types import Scope

from prefixserve import __version__
from prefixserve.adapters.store import AdapterStore
from prefixserve.api import routes_adapters, routes_generate, routes_openai, routes_openai_misc, routes_ops
from prefixserve.api.auth import KeyRing, Principal
from prefixserve.api.error_docs import ADAPTER_ERRORS, ADMIN_ERRORS, GENERATION_ERRORS, OPENAI_ERRORS
from prefixserve.api.errors import install_error_handlers
from prefixserve.api.middleware import AuthMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from prefixserve.api.state import ServerState
from prefixserve.config import Settings
from prefixserve.console import CONSOLE_PATH, install_console
from prefixserve.metrics_live import EngineView, register_live_metrics
from prefixserve.runtime import Runtime

if TYPE_CHECKING:  # imported for real only when tracing is on: off, the OpenTelemetry SDK is never loaded
    pass

log = logging.getLogger(__name__)


DOCS_PATH = "/docs"
DOCS_STATIC_PATH = "/static-offline-docs"  # Swagger UI's files, served from the package

TEMP_SWEEP_SECONDS = 60.0


async def sweep_periodically(store: AdapterStore) -> None:
    """Temp files left by a crashed upload go within minutes, not at the next restart."""
    while True:
        await asyncio.sleep(TEMP_SWEEP_SECONDS)
        try:
            await asyncio.to_thread(store.sweep_temp_files)
        except Exception:  # a store that is unreachable for a while must not end the sweeping
            log.exception("sweeping the adapter store's temp files failed")


_bearer = HTTPBearer(auto_error=False, description="An API key from the server's keys file, when it has one.")


def get_principal(request: Request, _: object = Security(_bearer)) -> Principal:
    """Set by AuthMiddleware before the body was read; this dependency documents the scheme in OpenAPI."""
    return request.state.principal


MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an upload's files


def body_limits(settings: Settings) -> Callable[[Scope], tuple[int, str]]:
    """Adapter uploads (multipart) may be as large as an adapter; every other body, generation requests and
    `from_text` included, is held to --max-request-mb."""
    upload = int(settings.max_adapter_mb * 2**20) + MULTIPART_OVERHEAD
    upload_text = f"{settings.max_adapter_mb:.1f} MB for adapter uploads (--max-adapter-mb)"
    other = int(settings.max_request_mb * 2**20)
    other_text = f"{settings.max_request_mb:.1f} MB for this request (--max-request-mb)"

    def limit_for(scope: Scope) -> tuple[int, str]:
        content_type = Headers(scope=scope).get("content-type", "")
        if (
            scope["method"] in ("PUT", "POST")
            and scope["path"].startswith(routes_adapters.router.prefix)
            and content_type.startswith("multipart/")
        ):
            return upload, upload_text
        return other, other_text

    return limit_for


def create_app(runtime: Runtime, keyring: KeyRing | None = None, start_engine: bool = True) -> FastAPI:
    """With `start_engine=False` the caller runs the engine's loop itself (the server: on the main thread)."""
    state = ServerState(runtime, keyring)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            runtime.engine.start()
        sweeper = asyncio.create_task(sweep_periodically(runtime.store))
        yield
        sweeper.cancel()
        runtime.engine.stop_accepting()
        runtime.engine.cancel_all()
        await asyncio.to_thread(runtime.engine.join, 10)
        if state.tracing is not None:
            await asyncio.to_thread(state.tracing.shutdown)  # the last batch of spans

    # /docs with Swagger UI's assets served from the package, not a CDN. No /redoc: ReDoc's page loads
    # its logo from cdn.redoc.ly.
    app = FastAPIOffline(
        docs_url=DOCS_PATH,  # FastAPIOffline serves it itself: app.docs_url stays None
        redoc_url=None,
        static_url=DOCS_STATIC_PATH,
        title="prefixserve",
        version=__version__,
        description="Serve PEFT prompt-learning adapters (prefix tuning, prompt tuning, P-tuning) on one frozen base model, batched across adapters. "
        "Authenticate with `Authorization: Bearer <key>` when the server has API keys.",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    engine = runtime.engine
    view = EngineView(
        num_running=lambda: engine.num_running,
        num_waiting=lambda: engine.num_waiting,
        kv_cache_usage=engine.kv_cache_usage,
        running_adapters=engine.running_adapters,
        waiting_adapters=engine.waiting_adapters,
        max_adapters=runtime.settings.max_batch_size,
        model_name=runtime.settings.served_model_name,
    )
    register_live_metrics(view, runtime.settings.metrics_adapter_names or ("digest" if keyring else "plain"))

    # Added last runs first: request id, then the key (from headers only), then the trace (when on), then the
    # body, counted as it comes.
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limits(runtime.settings))
    if runtime.settings.otlp_traces_endpoint:  # after authentication: a refused key costs no span
        from prefixserve.api.tracing import Tracing, TracingMiddleware

        state.tracing = Tracing(runtime.settings.otlp_traces_endpoint, state.model_name)
        generation = [
            r.path for router in (routes_generate.router, routes_openai.router) for r in router.routes
        ]
        app.add_middleware(TracingMiddleware, tracing=state.tracing, routes=generation)
    open_paths = {route.path for route in routes_ops.router.routes}
    open_paths |= {p for p in (DOCS_PATH, app.openapi_url, app.swagger_ui_oauth2_redirect_url) if p}
    app.add_middleware(
        AuthMiddleware,
        authenticator=state.authenticator,
        open_paths=open_paths,
        open_reads={"/"},  # GET / redirects to the console; POST / is TGI's generation route
        open_trees={CONSOLE_PATH, DOCS_STATIC_PATH},
    )
    app.add_middleware(RequestIdMiddleware)
    if runtime.settings.cors_allow_origins:  # off by default: browsers may call the API only from these
        app.add_middleware(
            CORSMiddleware,
            allow_origins=runtime.settings.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id"],
        )

    authenticated = [Depends(get_principal)]
    app.include_router(routes_ops.router)
    app.include_router(routes_ops.admin_router, dependencies=authenticated, responses=ADMIN_ERRORS)
    app.include_router(routes_generate.router, dependencies=authenticated, responses=GENERATION_ERRORS)
    app.include_router(routes_openai.router, dependencies=authenticated, responses=OPENAI_ERRORS)
    app.include_router(routes_openai_misc.router, dependencies=authenticated, responses=OPENAI_ERRORS)
    app.include_router(routes_adapters.router, dependencies=authenticated, responses=ADAPTER_ERRORS)
    install_console(app)
    return app
