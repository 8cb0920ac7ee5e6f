"""Settings: one source for CLI flags (`--max-batch-size 8`) and env vars (`PREFIXSERVE_MAX_BATCH_SIZE=8`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefixserve.adapters.locations import S3Location, parse_store_location

# The sections of `prefixserve serve --help`, in order; tests check that every setting is in exactly one.
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("model", "model_name", "device", "dtype", "num_threads", "attention_backend", "malloc"),
    "limits": (
        "max_batch_size",
        "kv_cache_mb",
        "block_size",
        "max_queue_size",
        "max_total_tokens",
        "max_input_tokens",
        "max_new_tokens",
        "default_max_new_tokens",
        "max_prefill_tokens",
        "max_request_mb",
    ),
    "prefix cache": ("prefix_caching", "prefix_cache_scope"),
    "adapters": (
        "adapter_dir",
        "adapter_cache_mb",
        "max_virtual_tokens",
        "max_adapter_mb",
        "adapter_refresh_seconds",
    ),
    "HTTP and access": (
        "host",
        "port",
        "json_logs",
        "cors_allow_origins",
        "api_keys_file",
        "allow_anonymous",
        "max_concurrent_per_tenant",
        "drain_seconds",
    ),
    "observability": ("metrics_adapter_names", "otlp_traces_endpoint"),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFIXSERVE_",
        cli_kebab_case=True,
        cli_prog_name="prefixserve serve",
        cli_implicit_flags=True,
        cli_exit_on_error=False,  # cli.py words the error: argparse's usage line spells types `{str,null}`
        extra="forbid",
    )

    # Model
    model: str = Field(
        "tiny",
        description="Base model: a Hugging Face hub id, a local directory, or 'tiny' for the built-in demo model.",
    )
    model_name: str | None = Field(
        None, description="Name under which the base model is served (OpenAI `model`); default: --model."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present, else cpu.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto = bfloat16 on cuda (float16 where bf16 is unsupported) and on CPUs with native bf16 "
        "(avx512_bf16 or AMX), else float32.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's choice)."
    )
    attention_backend: Literal["auto", "native", "portable"] = Field(
        "auto",
        description="Decode attention: native = the C++ paged kernel (CPU, float32/bfloat16; built on first "
        "start with the C++ compiler, cached in PREFIXSERVE_KERNEL_CACHE), portable = gather + matmul, auto = "
        "native where it builds, else portable (logged).",
    )
    malloc: Literal["auto", "tcmalloc", "system"] = Field(
        "auto",
        description="The memory allocator (Linux): tcmalloc = restart the process with libtcmalloc_minimal.so.4 "
        "preloaded (Debian/Ubuntu: apt-get install libtcmalloc-minimal4; a decode step measured 3-6% faster), "
        "system = the C library's, auto = tcmalloc where it is installed (logged).",
    )

    # Limits
    max_batch_size: int = Field(
        128, ge=1, description="Most rows in one forward pass (the KV pool may admit fewer)."
    )
    kv_cache_mb: float | None = Field(
        None,
        gt=0,
        description="Size of the KV block pool that all rows and active adapter prefixes share, in MB. "
        "Default: 1024 on cpu; on cuda, 90% of the memory free after loading the model.",
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    prefix_caching: bool = Field(
        True,
        description="Keep the keys/values of prompts' full blocks in the KV pool after a request ends, so that "
        "requests repeating a prompt's beginning (system prompts, chat history) skip it; --no-prefix-caching: off.",
    )
    prefix_cache_scope: Literal["tenant", "global"] = Field(
        "tenant",
        description="Who shares cached blocks: tenant = only requests of one tenant (a hit is a timing signal); "
        "global = base-model blocks across tenants too (adapters belong to one tenant either way).",
    )
    max_queue_size: int = Field(
        256, ge=0, description="Most requests waiting beyond the free batch rows; more get 429."
    )
    max_total_tokens: int = Field(
        2048, ge=2, description="Most tokens of one row: adapter prefix + prompt + generated tokens."
    )
    max_input_tokens: int = Field(
        1024, ge=1, description="Longest prompt accepted, in tokens (capped at max_total_tokens - 1)."
    )
    max_new_tokens: int = Field(1024, ge=1, description="Largest max_new_tokens a request may ask for.")
    default_max_new_tokens: int = Field(64, ge=1, description="max_new_tokens when a request gives none.")
    max_prefill_tokens: int = Field(
        4096,
        ge=1,
        description="Token budget of one step: a token per decoding row, then prompt chunks of rows joining.",
    )

    # Adapters
    # Text, not a Path, until parsed: Path("s3://b/p") would collapse the double slash.
    adapter_dir: Annotated[S3Location | Path, BeforeValidator(parse_store_location)] = Field(
        Path("adapter-store"),
        union_mode="left_to_right",
        description="Durable adapter store: a directory (a shared volume for several replicas; a relative path "
        "is taken from the current directory, the absolute path is logged at start-up), or s3://BUCKET/PREFIX "
        "for an S3-compatible bucket (endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_REGION).",
    )
    adapter_cache_mb: float = Field(
        512.0,
        gt=0,
        description="Host memory for decoded adapter prefixes, ready to copy into the KV pool (LRU by bytes).",
    )
    max_virtual_tokens: int = Field(256, ge=1, description="Largest num_virtual_tokens an adapter may have.")
    max_adapter_mb: float = Field(64.0, gt=0, description="Largest adapter upload accepted, in MB.")
    max_request_mb: float = Field(
        2.0,
        gt=0,
        description="Largest request body other than an adapter upload (generation, from_text), in MB; "
        "counted as it streams in, chunked bodies too.",
    )
    adapter_refresh_seconds: float = Field(
        2.0,
        ge=0,
        description="How stale a cached adapter may be before the store is checked for a newer version "
        "(matters when several replicas share one store).",
    )

    # HTTP
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 = any free port).")
    json_logs: bool = Field(False, description="Log one JSON object per line.")
    metrics_adapter_names: Literal["plain", "digest"] | None = Field(
        None,
        description="How /metrics names adapters in use (it needs no key): plain ids, as requests name them "
        "(what a gateway's adapter-affinity routing needs), or per-process digests. Default: plain without "
        "API keys, digest with them.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (CORS), e.g. https://app.example.com; "
        "'*' for any. Off by default.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="JSON file of API keys and their tenants. Required when binding a non-loopback address, "
        "unless --allow-anonymous.",
    )
    allow_anonymous: bool = Field(
        False, description="Serve without API keys on a non-loopback address (one shared tenant)."
    )
    max_concurrent_per_tenant: int = Field(
        64, ge=1, description="Most requests one tenant may have running or waiting at once; more get 429."
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM: /ready turns 503, running requests get this long to finish."
    )

    # Observability
    otlp_traces_endpoint: str | None = Field(
        None,
        description="Send OpenTelemetry traces (OTLP over HTTP, protobuf) to this URL, e.g. "
        "http://localhost:4318/v1/traces (a URL without a path gets /v1/traces): a span per generation "
        "request with children for queue, adapter load, prefill and decode. Off by default. The OTEL_* "
        "variables for the service name, resource attributes, exporter headers and batching apply.",
    )

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, url: str | None) -> str | None:
        if url and not url.startswith(("http://", "https://")):  # empty: off, as when unset
            raise ValueError(
                f"must be the http:// or https:// URL of an OTLP/HTTP receiver (OTLP over gRPC is not "
                f"supported), e.g. http://localhost:4318/v1/traces; got {url!r}"
            )
        return url or None

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model
