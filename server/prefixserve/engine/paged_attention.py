"""Attention over the KV block pool, plugged into transformers' attention interface.

The engine runs a step as one flat sequence of tokens from many rows (no padding): `input_ids` [1, N]. Each
layer's attention module computes queries, keys and values (with its own rotary embedding, norms, biases) and
calls the registered function below, which writes the new keys/values into the pool and attends, for every
row, over exactly the slots that row holds (its adapter prefix, then its own tokens):

- rows taking one token (decoding) are done together: their context slots are gathered once into a flat
  list and a segmented softmax runs over it, so a short row never pays for a long one;
- rows taking several tokens (prompt chunks) each get one SDPA call with a causal mask aligned to the end.

Calls without a batch (from_text, the self-check's reference) fall through to transformers' SDPA, so the one
loaded model serves both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from prefixserve.engine.kv_cache import KVPool

ATTN_IMPLEMENTATION = "prefixserve_paged"
BATCH_KWARG = "prefixserve_batch"


@dataclass
class PrefillRow:
    query_start: int
    query_len: int
    context_slots: torch.Tensor  # [context] slots in order, the new tokens' last
    causal_mask: torch.Tensor | None  # [query_len, context]; None when a single query sees all


@dataclass
class AttentionBatch:
    """Where one step's tokens go and what each row attends over; built once per step, used by every layer."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [N] slot of each new token
    decode_queries: torch.Tensor  # [D] flat positions of the single-token rows' queries
    decode_slots: torch.Tensor  # [C] the context slots of all single-token rows, row after row
    decode_rows: torch.Tensor  # [C] which single-token row (0..D-1) each context slot belongs to
    prefill: list[PrefillRow]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    batch = kwargs.pop(BATCH_KWARG, None)
    if batch is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    assert isinstance(batch, AttentionBatch)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention logit soft-capping and sinks are not supported")
    layer = module.layer_idx
    k_pool, v_pool = batch.pool.keys[layer], batch.pool.values[layer]
    k_pool.index_copy_(0, batch.slot_mapping, key[0].transpose(0, 1).to(k_pool.dtype))
    v_pool.index_copy_(0, batch.slot_mapping, value[0].transpose(0, 1).to(v_pool.dtype))
    q = query[0].transpose(0, 1)  # [N, q_heads, head_dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    if batch.decode_queries.numel():
        out[batch.decode_queries] = _decode(
            q.index_select(0, batch.decode_queries),
            k_pool,
            v_pool,
            batch.decode_slots,
            batch.decode_rows,
            scale,
        )
    for row in batch.prefill:
        qr = q[row.query_start : row.query_start + row.query_len].transpose(0, 1)[None]
        kr = k_pool.index_select(0, row.context_slots).transpose(0, 1)[None].to(q.dtype)
        vr = v_pool.index_select(0, row.context_slots).transpose(0, 1)[None].to(q.dtype)
        o = F.scaled_dot_product_attention(
            qr, kr, vr, attn_mask=row.causal_mask, scale=scale, enable_gqa=qr.shape[1] != kr.shape[1]
        )
        out[row.query_start : row.query_start + row.query_len] = o[0].transpose(0, 1)
    return out[None], None


def _decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row, each over its own context: a segmented softmax over the concatenated contexts."""
    num_rows, q_heads, head_dim = q.shape
    k = k_pool.index_select(0, slots).float()  # [C, kv_heads, head_dim]
    v = v_pool.index_select(0, slots).float()
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    q_ctx = q.float().view(num_rows, kv_heads, group, head_dim).index_select(0, rows)  # [C, kv, g, d]
    scores = torch.matmul(q_ctx, k.unsqueeze(-1)).squeeze(-1) * scale  # [C, kv, g]
    index = rows.view(-1, 1, 1).expand_as(scores)
    row_max = torch.full((num_rows, kv_heads, group), float("-inf"), device=q.device)
    row_max.scatter_reduce_(0, index, scores, "amax")
    weights = torch.exp(scores - row_max.index_select(0, rows))
    denom = torch.zeros_like(row_max).index_add_(0, rows, weights)
    out = torch.zeros(num_rows, kv_heads, group, head_dim, device=q.device)
    out.index_add_(0, rows, weights.unsqueeze(-1) * v.unsqueeze(2))
    return (out / denom.unsqueeze(-1)).view(num_rows, q_heads, head_dim).to(q.dtype)


def register() -> None:
    """Make `attn_implementation=ATTN_IMPLEMENTATION` available; its masks (for the SDPA fall-through) are SDPA's."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
