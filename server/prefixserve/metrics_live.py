"""Metrics read from the engine at scrape time: which adapters are in use, and the gauges a Gateway API
Inference Extension endpoint picker scrapes, under vLLM's names (its model-server protocol).

Read when Prometheus (or the picker) scrapes, so they are never stale and no old label sets pile up.

Adapter names. `prefixserve_adapter_requests_info` names adapters `tenant/adapter`. `vllm:lora_requests_info`
names them as a request's `model` does (`support`, or `a+b` for a composition), since that is what the
picker compares a request with; tenants never appear in it. /metrics needs no key (like vLLM's and TGI's),
so with API keys both show keyed digests instead of names by default (`--metrics-adapter-names digest`):
stable while the process runs, not reversible, and different on each replica. A gateway deployment that
wants adapter affinity with keys on sets `--metrics-adapter-names plain` and keeps /metrics off its public
route (deploy/gateway/ does both).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

AdapterLabel = tuple[str, str]  # (tenant, adapter name as requests give it)
NameStyle = Literal["plain", "digest"]


@dataclass(frozen=True)
class EngineView:
    """What the collectors read from the engine; callables, so the engine knows nothing of metrics."""

    num_running: Callable[[], int]
    num_waiting: Callable[[], int]
    kv_cache_usage: Callable[[], float]  # 0-1
    running_adapters: Callable[[], list[AdapterLabel]]
    waiting_adapters: Callable[[], list[AdapterLabel]]
    max_adapters: int  # the most distinct adapters one batch can hold: one per row
    model_name: str


class _Names:
    def __init__(self, style: NameStyle) -> None:
        self._key = secrets.token_bytes(16) if style == "digest" else None

    def __call__(self, names: list[str]) -> str:
        if self._key is not None:
            names = [hmac.new(self._key, n.encode(), hashlib.sha256).hexdigest()[:12] for n in names]
        return ",".join(sorted(set(names)))


class AdapterInfoCollector(Collector):
    """`prefixserve_adapter_requests_info`: adapters of running and waiting requests, as `tenant/adapter`."""

    def __init__(self, view: EngineView, names: NameStyle) -> None:
        self._view, self._names = view, _Names(names)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def label(refs: list[AdapterLabel]) -> str:
            return self._names([f"{tenant}/{name}" for tenant, name in refs])

        family = GaugeMetricFamily(
            "prefixserve_adapter_requests_info",
            "Adapters in use by running and waiting requests (value: scrape time)",
            labels=["running_adapters", "waiting_adapters", "max_adapters"],
        )
        running, waiting = self._view.running_adapters(), self._view.waiting_adapters()
        family.add_metric([label(running), label(waiting), str(self._view.max_adapters)], time.time())
        yield family


class GatewayCollector(Collector):
    """vLLM's names for the endpoint picker: queue, running rows, KV usage, adapters in use."""

    def __init__(self, view: EngineView, names: NameStyle) -> None:
        self._view, self._names = view, _Names(names)
        self._adapters: tuple[str, str] | None = None
        self._adapters_since = time.time()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._view
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch", view.num_running()),
            ("vllm:num_requests_waiting", "Requests waiting for a batch row", view.num_waiting()),
            ("vllm:kv_cache_usage_perc", "Fraction of the KV block pool in use (0-1)", view.kv_cache_usage()),
            # The name before vLLM 0.11, still the default of endpoint pickers before GIE v1.3.
            (
                "vllm:gpu_cache_usage_perc",
                "Same as vllm:kv_cache_usage_perc (older name)",
                view.kv_cache_usage(),
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([view.model_name], value)
            yield family
        adapters = (
            self._names([name for _, name in view.running_adapters()]),
            self._names([name for _, name in view.waiting_adapters()]),
        )
        if adapters != self._adapters:  # the value is when the set last changed, as vLLM reports it
            self._adapters, self._adapters_since = adapters, time.time()
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters (prefix adapters here) of running and waiting requests; value: Unix time of the last change",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        family.add_metric([str(view.max_adapters), *adapters], self._adapters_since)
        yield family


_registered: list[Collector] = []


def register_live_metrics(view: EngineView, names: NameStyle) -> None:
    """(Re)register the collectors for this engine: one app per process, but tests build several."""
    for collector in _registered:
        REGISTRY.unregister(collector)
    _registered[:] = [AdapterInfoCollector(view, names), GatewayCollector(view, names)]
    for collector in _registered:
        REGISTRY.register(collector)
