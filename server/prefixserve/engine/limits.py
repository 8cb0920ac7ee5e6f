"""What the operator bounds the engine with (`--max-batch-size`, `--kv-cache-mb`, ...): one frozen value the
engine, its request validation and the runtime share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 128
    max_queue_size: int = 256
    max_input_tokens: int = 1024
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_prefill_tokens: int = 4096  # tokens of one step: decoding rows, prompt chunks, joining prompts
    kv_cache_mb: float = 1024.0
    block_size: int = 16
