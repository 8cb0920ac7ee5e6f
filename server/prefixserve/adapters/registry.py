"""The adapter registry: ready-to-use K/V prefixes in host memory (the KV pool holds the device copy of a running
one), LRU by bytes, over the durable store.

A running request keeps its own reference to the prefix it was admitted with, so evicting or replacing
an adapter never frees memory under it; new requests get the new version. Each cached entry is checked
against the store at most every `refresh_seconds`, which bounds how long a replica can serve a version
that another replica has replaced or deleted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cachetools import Cache, LRUCache

from prefixserve import metrics
from prefixserve.adapters.errors import AdapterNotFoundError, InvalidAdapterError
from prefixserve.adapters.format import METHODS, PeftAdapter, method_of, validate_adapter
from prefixserve.adapters.ids import COMPOSE_SEPARATOR, AdapterRef
from prefixserve.adapters.kv_prefix import KVShape, LoadedPrefix, embeddings_to_kv
from prefixserve.adapters.store import AdapterInfo, AdapterStore

# Prompt kinds' virtual-token embeddings [T, hidden] → their keys/values [layers, 2, kv_heads, T, head_dim]:
# a forward pass of the base model, which the engine provides (engine/virtual_tokens.py).
Materializer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Entry:
    prefix: LoadedPrefix
    version: object  # store fingerprint, or component hashes for a composition
    checked_at: float


class _LoadedAdapters(LRUCache):
    """The LRU by bytes, counting its single adapters by kind as entries come and go: the gauges are set on
    every load, and counting by walking the cache cost a load time in proportion to the adapters cached
    (2.7 ms with 1,024)."""

    def __init__(self, maxsize: int, getsizeof: Callable[[_Entry], int]) -> None:
        super().__init__(maxsize, getsizeof)
        self.kinds: Counter[str] = Counter()

    def __setitem__(self, key: AdapterRef, entry: _Entry) -> None:  # type: ignore[override]
        if key in self:  # a new version: the old one leaves first, so an eviction below never counts it twice
            del self[key]
        super().__setitem__(key, entry)
        if len(key[1]) == 1:
            self.kinds[entry.prefix.method] += 1

    def __delitem__(self, key: AdapterRef) -> None:  # type: ignore[override]
        entry = Cache.__getitem__(self, key)  # without making it the most recently used
        super().__delitem__(key)
        if len(key[1]) == 1:
            self.kinds[entry.prefix.method] -= 1

    def clear(self) -> None:  # cachetools' clear empties the data without __delitem__
        super().clear()
        self.kinds.clear()

    def popitem(self):  # type: ignore[override]
        item = super().popitem()
        metrics.ADAPTER_CACHE_EVICTIONS.labels(item[1].prefix.method).inc()
        return item


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        shape: KVShape,
        dtype: torch.dtype,
        device: torch.device,
        cache_bytes: int,
        max_virtual_tokens: int,
        refresh_seconds: float,
        materialize: Materializer | None = None,
        context_tokens: int | None = None,
    ) -> None:
        self.store = store
        self.materialize = materialize
        self.context_tokens = context_tokens
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.max_virtual_tokens = max_virtual_tokens
        self.refresh_seconds = refresh_seconds
        self._cache = _LoadedAdapters(maxsize=cache_bytes, getsizeof=lambda entry: entry.prefix.nbytes)
        self._lock = threading.RLock()
        self._invalidations = 0  # bumped by every upload/delete; a load that overlapped one is not cached

    def validate(self, adapter: PeftAdapter) -> None:
        validate_adapter(adapter, self.shape, self.max_virtual_tokens, self.dtype, self.context_tokens)

    def put(self, namespace: str, adapter_id: str, adapter: PeftAdapter) -> tuple[AdapterInfo, bool]:
        """Validate, store durably, and make new requests see this version."""
        self.validate(adapter)
        info, created = self.store.put(namespace, adapter_id, adapter)
        self.invalidate(namespace, adapter_id)
        return info, created

    def delete(self, namespace: str, adapter_id: str) -> None:
        self.store.delete(namespace, adapter_id)
        self.invalidate(namespace, adapter_id)

    def invalidate(self, namespace: str, adapter_id: str) -> None:
        with self._lock:
            self._invalidations += 1
            for key in [k for k in self._cache if k[0] == namespace and adapter_id in k[1]]:
                del self._cache[key]
            self._update_gauges()

    def is_loaded(self, namespace: str, adapter_id: str) -> bool:
        with self._lock:
            return (namespace, (adapter_id,)) in self._cache

    def get(self, namespace: str, adapter_ids: tuple[str, ...]) -> LoadedPrefix:
        """The prefix for `adapter_ids` (one id, or several to concatenate in order)."""
        if len(adapter_ids) == 1:
            return self._get_single(namespace, adapter_ids[0])
        return self._get_composed(namespace, adapter_ids)

    def _get_single(self, namespace: str, adapter_id: str) -> LoadedPrefix:
        key = (namespace, (adapter_id,))
        with self._lock:
            entry = self._cache.get(key)
        now = time.monotonic()
        if entry is not None:
            if now - entry.checked_at < self.refresh_seconds:
                metrics.ADAPTER_CACHE_HITS.labels(entry.prefix.method).inc()
                return entry.prefix
            fingerprint = self.store.fingerprint(namespace, adapter_id)
            if fingerprint == entry.version:
                entry.checked_at = now
                metrics.ADAPTER_CACHE_HITS.labels(entry.prefix.method).inc()
                return entry.prefix
            with self._lock:
                self._cache.pop(key, None)
            if fingerprint is None:
                raise AdapterNotFoundError(adapter_id)
        # A miss reads the store outside the lock, so one cold load never stalls lookups of other adapters.
        start = time.perf_counter()
        invalidations = self._invalidations
        adapter, info, fingerprint = self.store.load(namespace, adapter_id)
        self.validate(adapter)
        prefix = self._prepare(namespace, adapter_id, info.sha256, adapter)
        # Cache it unless an upload or delete happened meanwhile: what was read may be the version it replaced.
        self._insert(key, _Entry(prefix, fingerprint, now), invalidations)
        metrics.ADAPTER_CACHE_MISSES.labels(prefix.method).inc()  # counted once the kind is known
        metrics.ADAPTER_LOAD_SECONDS.labels(prefix.method).observe(time.perf_counter() - start)
        return prefix

    def _prepare(self, namespace: str, adapter_id: str, sha256: str, adapter: PeftAdapter) -> LoadedPrefix:
        method = method_of(adapter.peft_type)
        if not adapter.is_prompt:
            kv = embeddings_to_kv(adapter.embeddings.to(self.dtype), self.shape).to(self.device)
            return LoadedPrefix(namespace, (adapter_id,), (sha256,), kv, method)
        # Its own memory (a few KB): the stored tensor may be a read-only view of the file it came from, and
        # this one is the model's input.
        embeddings = adapter.embeddings.to(self.dtype, copy=True)
        kv = self._materialize(embeddings, adapter.method)
        return LoadedPrefix(namespace, (adapter_id,), (sha256,), kv, method, embeddings)

    def _materialize(self, embeddings: torch.Tensor, method: str) -> torch.Tensor:
        if self.materialize is None:
            raise InvalidAdapterError(f"this registry has no base model to run {method} adapters with")
        return self.materialize(embeddings).to(self.device)

    def _get_composed(self, namespace: str, adapter_ids: tuple[str, ...]) -> LoadedPrefix:
        parts = [self._get_single(namespace, adapter_id) for adapter_id in adapter_ids]
        version = tuple(p.sha256[0] for p in parts)
        key = (namespace, adapter_ids)
        with self._lock:
            entry = self._cache.get(key)
        if entry is not None and entry.version == version:
            return entry.prefix
        name = COMPOSE_SEPARATOR.join(adapter_ids)
        total = sum(p.num_virtual_tokens for p in parts)
        if total > self.max_virtual_tokens:
            raise InvalidAdapterError(
                f"composition {name!r} has {total} virtual tokens, above this "
                f"server's limit of {self.max_virtual_tokens}; compose fewer or shorter adapters"
            )
        prompt_parts = [p.adapter_ids[0] for p in parts if p.embeddings is not None]
        if not prompt_parts:  # prefixes: a's keys/values, then b's
            prefix = LoadedPrefix(namespace, adapter_ids, version, torch.cat([p.kv for p in parts], dim=3))
        elif len(prompt_parts) == len(parts):  # virtual tokens: a's, then b's, run through the model together
            embeddings = torch.cat([p.embeddings for p in parts])  # type: ignore[misc]
            kv = self._materialize(embeddings, "prompt-learning")
            methods = {p.method for p in parts}
            method = methods.pop() if len(methods) == 1 else "prompt-learning"
            prefix = LoadedPrefix(namespace, adapter_ids, version, kv, method, embeddings)
        else:
            raise InvalidAdapterError(
                f"composition {name!r} mixes prefix adapters with prompt-learning adapters "
                f"({', '.join(prompt_parts)}): a prefix's keys/values and a prompt's virtual-token embeddings "
                "have no common order in PEFT; compose adapters of one kind (prefix-tuning and cartridges, or "
                "prompt tuning and P-tuning)"
            )
        self._insert(key, _Entry(prefix, version, time.monotonic()))
        return prefix

    def _insert(self, key: AdapterRef, entry: _Entry, invalidations: int | None = None) -> None:
        with self._lock, contextlib.suppress(ValueError):  # larger than the whole budget: serve it uncached
            if invalidations is None or invalidations == self._invalidations:
                self._cache[key] = entry
            self._update_gauges()

    def _update_gauges(self) -> None:
        metrics.ADAPTER_CACHE_BYTES.set(self._cache.currsize)
        for method in METHODS.values():
            metrics.ADAPTERS_LOADED.labels(method).set(self._cache.kinds[method])
