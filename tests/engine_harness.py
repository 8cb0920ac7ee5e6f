"""Drive an LLMEngine synchronously (no thread, no HTTP) for tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefixserve.adapters.format import read_adapter_dir
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store_dir import DirectoryStore
from prefixserve.engine.cpu.kernels import native_kernels
from prefixserve.engine.engine import LLMEngine
from prefixserve.engine.limits import EngineLimits
from prefixserve.engine.model_loader import load_model
from prefixserve.engine.prefix_cache import CacheScope
from prefixserve.engine.sequence import SamplingParams, Sequence, TokenEvent
from prefixserve.engine.virtual_tokens import virtual_token_materializer

NAMESPACE = "default"


@dataclass
class Collector:
    events: list[TokenEvent] = field(default_factory=list)
    seq: Sequence | None = None

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id >= 0]

    @property
    def text(self) -> str:
        return "".join(e.text_delta for e in self.events)

    @property
    def finish_reason(self):
        return self.events[-1].finish_reason if self.events else None


def make_engine(
    model_dir: Path | str,
    store_dir: Path,
    adapters: dict[str, Path] | None = None,
    cache_bytes: int = 64 * 2**20,
    max_batch_size: int = 8,
    max_queue_size: int = 64,
    max_total_tokens: int = 256,
    max_prefill_tokens: int = 4096,
    kv_cache_mb: float = 64.0,
    block_size: int = 16,
    dtype: str = "float32",
    prefix_caching: bool = True,
    cache_scope: CacheScope = CacheScope.TENANT,
    attention: str = "auto",
) -> LLMEngine:
    """`attention`: --attention-backend (auto: the native decode kernel where it builds, as the server does)."""
    loaded = load_model(str(model_dir), "cpu", dtype, max_total_tokens)
    registry = AdapterRegistry(
        DirectoryStore(store_dir),
        loaded.kv_shape,
        loaded.dtype,
        loaded.device,
        cache_bytes=cache_bytes,
        max_virtual_tokens=64,
        refresh_seconds=0.0,
        materialize=virtual_token_materializer(loaded.model),
        context_tokens=loaded.max_length,
    )
    for name, path in (adapters or {}).items():
        registry.put(NAMESPACE, name, read_adapter_dir(path))
    limits = EngineLimits(
        max_batch_size=max_batch_size,
        max_queue_size=max_queue_size,
        max_input_tokens=128,
        max_prefill_tokens=max_prefill_tokens,
        kv_cache_mb=kv_cache_mb,
        block_size=block_size,
    )
    return LLMEngine(
        loaded,
        registry,
        limits,
        prefix_caching=prefix_caching,
        cache_scope=cache_scope,
        kernels=native_kernels(attention, loaded.device, loaded.dtype),
    )


def submit(
    engine: LLMEngine, prompt: str, adapter: str | None, tenant: str | None = None, **params
) -> Collector:
    sink = Collector()
    ids = engine.loaded.tokenizer.encode(prompt)
    ref = (NAMESPACE, tuple(adapter.split("+"))) if adapter else None
    sink.seq = engine.submit(ids, ref, SamplingParams(**params), sink, tenant)
    return sink


def submit_ids(
    engine: LLMEngine,
    ids: list[int],
    adapter: str | None,
    tenant: str | None = None,
    cache_salt: str | None = None,
    **params,
) -> Collector:
    sink = Collector()
    ref = (NAMESPACE, tuple(adapter.split("+"))) if adapter else None
    sink.seq = engine.submit(ids, ref, SamplingParams(**params), sink, tenant, cache_salt)
    return sink


def run_until_idle(engine: LLMEngine, max_steps: int = 10_000) -> int:
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return steps
