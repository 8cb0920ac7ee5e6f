"""Prometheus metrics, named as operators of TGI and vLLM know them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# `method`: the adapter's kind (prefix-tuning, cartridge, prompt-tuning, p-tuning; a composition's parts' kind).
ADAPTER_CACHE_HITS = Counter(
    "prefixserve_adapter_cache_hits",
    "Adapter lookups served from the adapter cache (host memory, --adapter-cache-mb)",
    ["method"],
)
ADAPTER_CACHE_MISSES = Counter(
    "prefixserve_adapter_cache_misses", "Adapter lookups that loaded from the store", ["method"]
)
ADAPTER_CACHE_EVICTIONS = Counter(
    "prefixserve_adapter_cache_evictions", "Adapters evicted from the adapter cache", ["method"]
)
ADAPTER_LOAD_SECONDS = Histogram(
    "prefixserve_adapter_load_seconds",
    "Time to load an adapter from the store into the adapter cache (prompt kinds: with the base model's pass over "
    "their virtual tokens)",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
ADAPTERS_LOADED = Gauge("prefixserve_adapters_loaded", "Adapters held in the adapter cache", ["method"])
ADAPTER_CACHE_BYTES = Gauge(
    "prefixserve_adapter_cache_bytes", "Bytes of adapter prefixes held in the adapter cache"
)

REQUEST_COUNT = Counter("prefixserve_request_count", "Generation requests finished", ["finish_reason"])
REQUEST_SUCCESS = Counter("prefixserve_request_success", "Generation requests that finished without error")
REQUEST_FAILURE = Counter("prefixserve_request_failure", "Requests refused or failed", ["error_type"])
REQUEST_DURATION = Histogram(
    "prefixserve_request_duration_seconds", "End-to-end request time", buckets=_LATENCY_BUCKETS
)
REQUEST_QUEUE_DURATION = Histogram(
    "prefixserve_request_queue_duration_seconds",
    "Time spent waiting for a batch row",
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "prefixserve_time_to_first_token_seconds",
    "Time from arrival to the first token",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "prefixserve_time_per_output_token_seconds",
    "Mean time between output tokens of a request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
PROMPT_TOKENS = Counter("prefixserve_prompt_tokens", "Prompt tokens processed")
GENERATED_TOKENS = Counter("prefixserve_generated_tokens", "Tokens generated")
BATCH_SIZE = Gauge("prefixserve_batch_current_size", "Rows in the running batch")
QUEUE_SIZE = Gauge("prefixserve_queue_size", "Requests waiting for a batch row")
KV_CACHE_USAGE = Gauge("prefixserve_kv_cache_usage_ratio", "Fraction of the KV block pool in use (0-1)")
PREEMPTIONS = Counter(
    "prefixserve_preemptions", "Rows pushed out of a full KV pool, to be recomputed when blocks free up"
)

# The prompt cache, in tokens, under vLLM v1's names (so its dashboards work) and prefixserve's own; the hit
# rate is rate(hits) / rate(queries).
VLLM_PREFIX_CACHE_QUERIES = Counter(
    "vllm:prefix_cache_queries", "Prompt tokens of admitted requests looked up in the prefix cache"
)
VLLM_PREFIX_CACHE_HITS = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
PREFIX_CACHE_QUERIES = Counter(
    "prefixserve_prefix_cache_queries_tokens",
    "Prompt tokens of admitted requests looked up in the prefix cache",
)
PREFIX_CACHE_HITS = Counter(
    "prefixserve_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache (not computed again)"
)
PREFIX_CACHE_BLOCKS = Gauge("prefixserve_prefix_cache_blocks", "KV blocks registered in the prefix cache")
