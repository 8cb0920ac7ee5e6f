"""Handing a pre-filled key/value cache to a transformers model, under the argument name its version takes.

transformers 5.24 renamed the models' `past_key_values` argument to `cache` (the old name warns, and is announced
for removal in 5.40); earlier releases take only `past_key_values`. Every call in prefixserve that gives a model
a cache goes through `cache_kwargs`, so neither version warns and the day the old name goes nothing breaks.
"""

from __future__ import annotations

import inspect
from functools import cache as memoize

import torch
from transformers import DynamicCache, PretrainedConfig


@memoize
def _cache_argument(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """`{"cache": cache}` where the model's forward takes `cache`, else `{"past_key_values": cache}`."""
    return {_cache_argument(type(model)): cache}


def prefilled_cache(config: PretrainedConfig, kv: torch.Tensor | None = None) -> DynamicCache:
    """A DynamicCache holding kv [layers, 2, heads, T, head_dim] (one row) as its first T positions; empty for None."""
    cache = DynamicCache(config=config)
    if kv is not None:
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)
    return cache


@torch.inference_mode()
def base_model_kv(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The keys/values the base model computes for one row (`input_ids` or `inputs_embeds`, batch 1) at
    positions 0..T-1: [layers, 2, kv_heads, T, head_dim], keys after their rotary embedding, in model dtype."""
    first = next(iter(inputs.values()))
    cache = prefilled_cache(model.config)
    model(
        **inputs,
        attention_mask=torch.ones(first.shape[:2], dtype=torch.long, device=first.device),
        use_cache=True,
        logits_to_keep=1,
        **cache_kwargs(model, cache),
    )
    return torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])
