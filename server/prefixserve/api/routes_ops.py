"""Operations: liveness, readiness, info, Prometheus metrics, resetting the prefix cache."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prefixserve import __version__
from prefixserve.api.error_docs import ErrorBody
from prefixserve.api.errors import APIError

router = APIRouter(tags=["operations"])  # open: probes and scrapers carry no key
admin_router = APIRouter(tags=["operations"])  # behind the API keys


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process is up and its model is loaded."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorBody, "description": "Draining for shutdown"}})
def ready(request: Request) -> Response:
    """Readiness: 503 while draining, so load balancers stop sending new requests."""
    state = request.app.state.server
    if state.draining:
        return JSONResponse({"error": "draining", "error_type": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/info")
def info(request: Request) -> dict[str, object]:
    state = request.app.state.server
    s = state.settings
    return {
        "model_id": state.model_name,
        "model_dtype": str(state.loaded.dtype).removeprefix("torch."),
        "model_device_type": state.loaded.device.type,
        "max_batch_size": s.max_batch_size,
        "max_concurrent_requests": s.max_batch_size + s.max_queue_size,
        "max_input_tokens": state.engine.limits.max_input_tokens,
        "max_total_tokens": state.engine.max_length,
        "max_new_tokens": s.max_new_tokens,
        "max_virtual_tokens": s.max_virtual_tokens,
        "max_adapter_mb": s.max_adapter_mb,
        "adapter_cache_mb": s.adapter_cache_mb,
        "kv_cache_blocks": state.engine.pool.num_blocks,
        "kv_block_size": state.engine.pool.block_size,
        "prefix_caching": state.engine.prefix_caching,
        "prefix_cache_scope": state.engine.cache_scope.value,
        "version": __version__,
        "router": "prefixserve",
    }


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus_metrics() -> Response:
    """Prometheus metrics, open like TGI's and vLLM's. With API keys, adapter ids in
    `prefixserve_adapter_requests_info` are replaced by opaque per-process digests, so no tenant's adapter
    names leak."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@admin_router.post(
    "/reset_prefix_cache",
    responses={403: {"model": ErrorBody, "description": "With API keys: a key that is not an admin's"}},
)
async def reset_prefix_cache(request: Request) -> dict[str, object]:
    """Forget every cached prompt block (vLLM's endpoint). Running requests keep theirs; later ones compute their
    prompts again. With API keys configured, only an admin key may do it: the cache is every tenant's."""
    state = request.app.state.server
    if state.authenticator.keyring is not None and not request.state.principal.admin:
        raise APIError(403, "resetting the prefix cache needs an admin API key", "forbidden")
    count = await asyncio.wrap_future(state.engine.reset_prefix_cache())
    return {"status": "reset", "cached_blocks": count}
