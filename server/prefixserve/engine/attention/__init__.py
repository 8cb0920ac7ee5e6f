"""Attention over the KV block pool, plugged into transformers' attention interface.

The engine runs a step as one flat sequence of tokens from many rows (no padding): `input_ids` [1, N]. Each
layer's attention module computes queries, keys and values (with its own rotary embedding, norms, biases) and
calls `paged_attention` (registered under ATTN_IMPLEMENTATION), which has the step's backend write the new keys/values into the
pool and attend, for every row, over exactly the slots that row
holds (its adapter prefix, then its own tokens).

A backend (`AttentionBackend`) builds its metadata once per step from the step's `StepLayout` (layout.py:
block tables and lengths) and then runs `forward` per layer. `portable` (gather + SDPA) runs anywhere;
`native` sends decoding rows to the native CPU kernel. A new backend (another kernel, another device) is one
module with those two methods, chosen in runtime.py.

Calls without a batch (from_text, the self-check's reference) fall through to transformers' SDPA, so the one
loaded model serves both paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from prefixserve.engine.attention.layout import StepLayout
from prefixserve.engine.kv_cache import KVPool

ATTN_IMPLEMENTATION = "prefixserve_paged"
BATCH_KWARG = "prefixserve_batch"


class AttentionBackend(Protocol):
    name: str

    def store(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Write the step's new keys and values ([kv_heads, N, head_dim], any strides) to their slots ([N])."""
        ...

    def build(self, layout: StepLayout, pool: KVPool) -> Any:
        """The step's metadata, built once, read by every layer's `forward`."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        metadata: Any,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Attend every row's queries (q: [q_heads, N, head_dim]) over the layer's pools ([kv_heads, slots,
        head_dim], this step's keys/values written already); write the results into `out` (q's shape)."""
        ...


@dataclass
class AttentionBatch:
    """What every layer of one step needs: where the new tokens go, and the backend with its metadata."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [N] slot of each new token
    backend: AttentionBackend
    metadata: Any


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
    k_pool, v_pool = batch.pool.keys[layer], batch.pool.values[layer]  # [kv_heads, slots, head_dim]
    batch.backend.store(
        key[0].to(k_pool.dtype), value[0].to(v_pool.dtype), k_pool, v_pool, batch.slot_mapping
    )
    q = query[0]  # [q_heads, N, head_dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    batch.backend.forward(q, k_pool, v_pool, batch.metadata, scale, out)
    return out.transpose(0, 1)[None], None


def register() -> None:
    """Make `attn_implementation=ATTN_IMPLEMENTATION` available; its masks (for the SDPA fall-through) are SDPA's."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
