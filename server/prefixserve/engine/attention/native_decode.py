"""The native backend: decoding rows through the native `paged_decode` kernel (engine/cpu/csrc/, built by
engine/cpu/kernels.py), every other row (prompt chunks) through the portable backend's groups.

The kernel takes all decoding rows of a step in one call per layer and reads each row's slots in the pool in
place, in the pool's dtype, with no gather, no cast and no padding; it reads the queries and writes the
results where the layer keeps them. It works head by head through the rows in the order given here: rows whose
contexts begin with the same slots (one adapter; one system prompt, held once in the prompt cache) come one
after another, so the slots they share are read from memory once and from the core's cache for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefixserve.engine.attention import portable
from prefixserve.engine.attention.causal_chunk import CausalChunk
from prefixserve.engine.attention.layout import StepLayout
from prefixserve.engine.kv_cache import KVPool


@dataclass
class DecodeRows:
    """Rows with one query each, attended by the native `paged_decode` straight from the pool."""

    tokens: torch.Tensor  # [rows] the flat token of each row's query
    slots: torch.Tensor  # [sum of contexts] each row's slots, its prefix's first, then its own
    starts: torch.Tensor  # [rows + 1] where each row's slots begin


@dataclass
class NativeMetadata:
    decode: DecodeRows | None
    groups: list[portable.RowGroup | CausalChunk]


def decode_rows(layout: StepLayout, rows: list[int]) -> DecodeRows:
    """The rows in the kernel's order: sorted by their block lists, so rows whose contexts begin with the same
    blocks (an adapter prefix, then a cached prompt's blocks) are neighbours."""
    order = sorted(rows, key=lambda r: (layout.prefix_blocks[r], layout.own_blocks[r]))
    starts = [0]
    for r in order:
        starts.append(starts[-1] + layout.context_len(r))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=layout.device)

    return DecodeRows(
        tensor([layout.query_starts[r] for r in order]), layout.flat_context_slots(order), tensor(starts)
    )


class NativeDecodeBackend:
    name = "native"

    def __init__(self, paged_decode: Callable[..., None], store_kv: Callable[..., None]) -> None:
        self.paged_decode = paged_decode  # torch.ops.prefixserve.paged_decode (engine/cpu/kernels.py)
        self._store_kv = store_kv  # torch.ops.prefixserve.store_kv

    def store(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        self._store_kv(key.transpose(0, 1), value.transpose(0, 1), k_pool, v_pool, slots)

    def build(self, layout: StepLayout, pool: KVPool) -> NativeMetadata:
        rows = range(layout.num_rows)
        single = [r for r in rows if layout.query_len(r) == 1]
        others = [r for r in rows if layout.query_len(r) != 1]
        return NativeMetadata(
            decode_rows(layout, single) if single else None, portable.group_rows(layout, others, pool)
        )

    def forward(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        metadata: NativeMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        if (d := metadata.decode) is not None:
            if (
                q.dtype == k_pool.dtype
            ):  # the kernel reads q and writes out as [tokens, q_heads, head_dim] views
                self.paged_decode(
                    q.transpose(0, 1), k_pool, v_pool, d.tokens, d.slots, d.starts, scale, out.transpose(0, 1)
                )
            else:  # queries in another dtype than the pool's: the kernel works on a copy in the pool's
                cast = q.to(k_pool.dtype)
                self.paged_decode(
                    cast.transpose(0, 1),
                    k_pool,
                    v_pool,
                    d.tokens,
                    d.slots,
                    d.starts,
                    scale,
                    cast.transpose(0, 1),
                )
                out.index_copy_(1, d.tokens, cast.index_select(1, d.tokens).to(out.dtype))
        portable.attend_groups(q, k_pool, v_pool, metadata.groups, scale, out)
