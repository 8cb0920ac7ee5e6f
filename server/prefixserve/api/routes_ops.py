"""Operations: liveness, readiness, info, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prefixserve import __version__
from prefixserve.api.error_docs import ErrorBody

router = APIRouter(tags=["operations"])


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
        "version": __version__,
        "router": "prefixserve",
    }


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus_metrics() -> Response:
    """Prometheus metrics, open like TGI's and vLLM's. With API keys, adapter ids in
    `prefixserve_adapter_requests_info` are replaced by opaque per-process digests, so no tenant's adapter
    names leak."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
