"""A long prompt chunk attends through SDPA's causal kernel instead of the row groups' masked call.

The row groups of portable.py attend through one SDPA call with an additive mask over the whole context, and
stack the query heads that share a kv head into the query dimension: a 2,048-token Qwen2.5-0.5B-shaped prompt
made a [14,336 x 2,068] fp32 mask and took 37 ms a layer. With `is_causal` the kernel needs no mask and skips
the masked half. A chunk's queries see everything before it (adapter prefix, cached or earlier prompt tokens)
and then causally its own keys. When what comes before is no longer than the chunk, the queries are padded in
front with as many dummy ones, which makes the whole context one causal square (their outputs are dropped):
one call. Otherwise the chunk attends in two calls, causally over its own keys and unmasked over the keys
before, merged by their log-sum-exps (SDPA's CPU kernel returns them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixserve.engine.attention.layout import StepLayout
from prefixserve.engine.kv_cache import KVPool, gather_rows

# Shorter chunks ride in the row groups, where many short prompts share one call. Per layer, one row, bf16,
# Qwen2.5-0.5B shape after a 20-token prefix, group -> this path: 128 queries 0.42 -> 0.39 ms, 512 2.7 -> 1.9,
# 2,048 37 -> 16; 2,048 more after 2,048 cached 69 -> 45 (two parts).
LONG_CHUNK = 128
# SDPA's fused CPU kernel, which also returns each query's log-sum-exp: output [1, heads, L, d], lse [1, heads, L].
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass
class CausalChunk:
    """One row's `queries` new tokens (flat tokens from `start`), after `before` keys every one of them sees."""

    start: int
    queries: int
    before: int
    # [kv_heads, before + queries]: rows of the pool flattened to [heads * slots, head_dim]
    context_index: torch.Tensor

    @classmethod
    def build(cls, layout: StepLayout, row: int, pool: KVPool) -> CausalChunk:
        context, queries = layout.context_len(row), layout.query_len(row)
        slots = layout.context_slots([row], context)[0]
        heads = torch.arange(pool.shape.num_kv_heads, device=layout.device)[:, None] * pool.keys[0].shape[1]
        return cls(layout.query_starts[row], queries, context - queries, heads + slots[None])

    def attend(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float, out: torch.Tensor
    ) -> None:
        """q, out: [q_heads, N, head_dim]; writes this chunk's queries."""
        q_heads, _, head_dim = q.shape
        group = q_heads // k_pool.shape[0]
        chunk = q[:, self.start : self.start + self.queries].to(k_pool.dtype)[None]  # [1, q_heads, L, d]

        def keys_values(columns: slice, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
            index = self.context_index[:, columns]
            return tuple(  # type: ignore[return-value]
                gather_rows(p, index.flatten())
                .view(*index.shape, head_dim)
                .repeat_interleave(repeat, 0)[None]
                for p in (k_pool, v_pool)
            )

        if self.before <= self.queries:  # one causal square: `before` dummy queries, then the chunk's
            padded = chunk.new_zeros(1, q_heads, self.before + self.queries, head_dim)
            padded[:, :, self.before :] = chunk
            k, v = keys_values(slice(None))
            o = torch.nn.functional.scaled_dot_product_attention(
                padded, k, v, is_causal=True, scale=scale, enable_gqa=True
            )[:, :, self.before :]
        else:
            o, lse = FLASH(chunk, *keys_values(slice(self.before, None), group), 0.0, True, scale=scale)
            o_before, lse_before = FLASH(
                chunk, *keys_values(slice(self.before), group), 0.0, False, scale=scale
            )
            total = torch.logaddexp(lse, lse_before)
            o = (
                o.float() * (lse - total).exp()[..., None]
                + o_before.float() * (lse_before - total).exp()[..., None]
            )
        out[:, self.start : self.start + self.queries] = o[0].to(out.dtype)
