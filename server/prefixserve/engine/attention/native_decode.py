"""The native backend: decoding rows through the native `paged_decode` kernel (engine/cpu/csrc/, built by
engine/cpu/kernels.py), every other row (prompt chunks) through the portable backend's groups.

The kernel takes all decoding rows of a step in one call per layer and reads each row's slots in the pool in
place, in the pool's dtype, with no gather, no cast and no padding. Rows whose contexts begin with the same
slots (one adapter and one system prompt, held once in the prompt cache) form a group whose shared slots are
read once for all its rows, with the same bits as when each row reads them alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefixserve.engine.attention import portable
from prefixserve.engine.attention.layout import StepLayout
from prefixserve.engine.kv_cache import KVPool

# Rows sharing at least this many leading slots are a group of the kernel; fewer (a short adapter prefix alone)
# are not worth the smaller parallelism of a group.
MIN_SHARED_SLOTS = 64
SHARED_QUANTUM = 16  # the kernel reads shared slots in whole vectors: counts are multiples of this
MAX_SHARING_ROWS = 8  # rows per group of the kernel: one group is one task per kv head (parallelism)


@dataclass
class DecodeRows:
    """Rows with one query each, attended by the native `paged_decode` straight from the pool."""

    tokens: torch.Tensor  # [rows] the flat token of each row's query
    slots: torch.Tensor  # [sum of contexts] each row's slots, its prefix's first, then its own
    starts: torch.Tensor  # [rows + 1] where each row's slots begin
    groups: torch.Tensor  # [groups + 1] runs of rows whose contexts begin with the same slots ...
    shared: torch.Tensor  # [groups] ... and how many: read once per group (a multiple of SHARED_QUANTUM)


@dataclass
class NativeMetadata:
    decode: DecodeRows | None
    groups: list[portable.RowGroup]


def decode_rows(layout: StepLayout, rows: list[int]) -> DecodeRows:
    """Rows whose contexts begin with the same slots (rows on one adapter; rows whose prompts start with the
    same cached blocks: one system prompt) are grouped, and the kernel reads those slots once per group.
    Decided on block lists: two contexts agree on their first slots exactly where they hold the same prefix
    blocks and then the same own blocks."""

    def signature(r: int) -> tuple[list[int], list[int]]:
        return layout.prefix_blocks[r], layout.own_blocks[r]

    order = sorted(rows, key=signature)  # rows sharing leading blocks are adjacent
    groups, shared = [0], []
    common = 0  # slots every row of the current group shares with its first row (a multiple of the quantum)
    for i, r in enumerate(order):
        if i > groups[-1]:
            leader = order[groups[-1]]
            joined = 0
            if i - groups[-1] < MAX_SHARING_ROWS:
                joined = min(common, _shared_slots(layout, leader, r) // SHARED_QUANTUM * SHARED_QUANTUM)
            if joined >= MIN_SHARED_SLOTS:
                common = joined
            else:
                shared.append(common if i - groups[-1] > 1 else 0)
                groups.append(i)
        if i == groups[-1]:
            common = (
                (layout.context_len(r) - 1) // SHARED_QUANTUM * SHARED_QUANTUM
            )  # its last slot is its own
    if order:
        shared.append(common if len(order) - groups[-1] > 1 else 0)
        groups.append(len(order))
    starts = [0]
    for r in order:
        starts.append(starts[-1] + layout.context_len(r))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=layout.device)

    return DecodeRows(
        tensor([layout.query_starts[r] for r in order]),
        layout.flat_context_slots(order),
        tensor(starts),
        tensor(groups),
        tensor(shared),
    )


def _shared_slots(layout: StepLayout, a: int, b: int) -> int:
    """How many leading slots the contexts of rows a and b have in common, b's last (its own new token) left out."""
    if layout.prefix_blocks[a] != layout.prefix_blocks[b]:
        return 0  # another prefix's blocks, or a prefix against own blocks: the first slots differ
    own_a, own_b = layout.own_blocks[a], layout.own_blocks[b]
    blocks = 0
    for x, y in zip(own_a, own_b, strict=False):
        if x != y:
            break
        blocks += 1
    own = min(blocks * layout.block_size, layout.own_lens[a], layout.own_lens[b] - 1)
    return layout.prefix_lens[a] + max(own, 0)


class NativeDecodeBackend:
    name = "native"

    def __init__(self, paged_decode: Callable[..., torch.Tensor]) -> None:
        self.paged_decode = paged_decode  # torch.ops.prefixserve.paged_decode

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
            rows_q = q.index_select(1, d.tokens).transpose(0, 1).contiguous()  # [rows, q_heads, head_dim]
            o = self.paged_decode(
                rows_q.to(k_pool.dtype), k_pool, v_pool, d.slots, d.starts, d.groups, d.shared, scale
            )
            out.index_copy_(1, d.tokens, o.transpose(0, 1).to(q.dtype))
        portable.attend_groups(q, k_pool, v_pool, metadata.groups, scale, out)
