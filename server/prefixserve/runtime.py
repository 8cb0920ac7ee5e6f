"""Builds the running parts from Settings: model, adapter store and registry, engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from prefixserve.adapters.locations import S3Location
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store import AdapterStore
from prefixserve.adapters.stores import open_store
from prefixserve.config import Settings
from prefixserve.engine.cpu.kernels import native_kernels
from prefixserve.engine.engine import LLMEngine
from prefixserve.engine.limits import EngineLimits
from prefixserve.engine.model_loader import LoadedModel, load_model
from prefixserve.engine.prefix_cache import CacheScope
from prefixserve.engine.self_check import check_prefix_serving
from prefixserve.engine.virtual_tokens import virtual_token_materializer

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    loaded: LoadedModel
    store: AdapterStore
    registry: AdapterRegistry
    engine: LLMEngine


CPU_KV_CACHE_MB = 1024.0


def default_kv_cache_mb(device: torch.device) -> float:
    """On a GPU the pool takes 90% of what the model left (the rest is headroom for activations); on a CPU,
    where memory is shared with everything else, a fixed gigabyte. Adapter prefixes are cached in host
    memory (--adapter-cache-mb) and take pool blocks only while rows use them."""
    if device.type != "cuda":
        return CPU_KV_CACHE_MB
    free, _ = torch.cuda.mem_get_info(device)
    return max(64.0, 0.9 * free / 2**20)


def build_runtime(settings: Settings) -> Runtime:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.max_total_tokens)
    delta = check_prefix_serving(loaded)
    log.info("prefix self-check passed: max |dlogit| %.2e against transformers' DynamicCache path", delta)
    store = open_store(settings.adapter_dir)
    location = settings.adapter_dir
    relative = (
        ""
        if isinstance(location, S3Location) or location.is_absolute()
        else " (--adapter-dir is relative to the current directory)"
    )
    log.info("adapter store: %s%s", store.describe(), relative)
    registry = AdapterRegistry(  # host memory: the KV pool holds the one device copy of a running prefix
        store,
        loaded.kv_shape,
        loaded.dtype,
        torch.device("cpu"),
        cache_bytes=int(settings.adapter_cache_mb * 2**20),
        max_virtual_tokens=settings.max_virtual_tokens,
        refresh_seconds=settings.adapter_refresh_seconds,
        materialize=virtual_token_materializer(loaded.model),
        context_tokens=loaded.max_length,
    )
    limits = EngineLimits(
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        max_input_tokens=min(settings.max_input_tokens, loaded.max_length - 1),
        max_new_tokens=settings.max_new_tokens,
        default_max_new_tokens=settings.default_max_new_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        kv_cache_mb=settings.kv_cache_mb or default_kv_cache_mb(loaded.device),
        block_size=settings.block_size,
    )
    engine = LLMEngine(
        loaded,
        registry,
        limits,
        prefix_caching=settings.prefix_caching,
        cache_scope=CacheScope(settings.prefix_cache_scope),
        kernels=native_kernels(settings.attention_backend, loaded.device, loaded.dtype),
    )
    return Runtime(settings, loaded, store, registry, engine)
