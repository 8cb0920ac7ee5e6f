"""The portable backend: gather each group of rows' context from the pool, then SDPA (any device, any dtype).

Rows are grouped by shape once per step (`group_rows`): rows of similar query and context lengths share one
gather from the pool and one SDPA call over [rows, heads, queries, context], masked per row. A group is closed
as soon as its padded area would exceed its real work by a quarter, so a short row never pays for the batch's
longest one; a batch of similar rows (the common decode step) is one group, one call per layer. Rows sharing
a long adapter prefix attend to it together (cascade): gathered once, one matmul for all their queries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixserve.engine.attention.causal_chunk import LONG_CHUNK, CausalChunk
from prefixserve.engine.attention.layout import StepLayout
from prefixserve.engine.kv_cache import KVPool, gather_rows

MAX_PADDING = 1.25  # a group's padded area (rows x queries x context) may exceed its real work by this much
# A prefix this long, held by two or more rows of a step, is attended once for all of them (cascade). Shorter
# ones ride in each row's context: splitting a batch by adapter would cost more calls than it saves.
CASCADE_MIN_PREFIX = 64


@dataclass
class RowGroup:
    """Rows padded to a common [queries, context] shape; built once per step, used by every layer.

    With `prefix_index`, every row of the group shares that prefix (gathered once, attended by all the
    group's queries in one matmul) and `context` counts only the rows' own tokens."""

    query_index: torch.Tensor  # [rows * queries] flat token of each padded query (a row's own when padding)
    context_index: torch.Tensor  # [kv_heads * rows * context] row of the pool flattened to [heads * slots, d]
    mask: torch.Tensor  # [rows, 1, queries, context] what each query may see (broadcast over kv heads)
    valid: torch.Tensor  # [n] which padded queries are real ...
    targets: torch.Tensor  # [n] ... and the flat token each one answers for
    rows: int
    queries: int
    context: int
    prefix_index: torch.Tensor | None = None  # [kv_heads * T] the shared prefix, flattened like context_index
    prefix_len: int = 0
    _stacked: dict[int, torch.Tensor] = field(default_factory=dict)  # stacked_mask's, by group size

    def stacked_mask(self, group: int) -> torch.Tensor:
        """The mask for queries stacked as [rows, group * queries] (the query heads sharing a kv head), made
        once per step for all layers: [1, rows, group * queries, context], additive fp32 (0 or -inf; SDPA
        would otherwise turn a boolean mask into this at every layer)."""
        if group not in self._stacked:
            mask = self.mask[:, 0, None].expand(self.rows, group, self.queries, self.context)
            mask = mask.reshape(self.rows, group * self.queries, self.context)[None]
            additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            self._stacked[group] = additive.masked_fill_(~mask, float("-inf"))
        return self._stacked[group]

    def attend(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float, out: torch.Tensor
    ) -> None:
        """q, out: [q_heads, N, head_dim]; the pools: [kv_heads, slots, head_dim]. Writes the group's queries."""
        q_heads, _, head_dim = q.shape
        kv_heads = k_pool.shape[0]
        group = q_heads // kv_heads
        # [kv_heads, rows, group * queries, head_dim]: the query heads that share a kv head, stacked
        qg = q.index_select(1, self.query_index).view(kv_heads, group, self.rows, self.queries, head_dim)
        qg = qg.transpose(1, 2).reshape(kv_heads, self.rows, group * self.queries, head_dim)
        kg = gather_rows(k_pool, self.context_index).view(kv_heads, self.rows, self.context, head_dim)
        vg = gather_rows(v_pool, self.context_index).view(kv_heads, self.rows, self.context, head_dim)
        if self.prefix_index is None:
            # SDPA's fused CPU kernel: no [queries x context] score matrix per head is written out (a 2,048-token
            # prompt's prefill attention measured 2.8x faster than matmul + masked softmax + matmul). It keeps
            # scores and softmax in fp32 whatever its inputs' dtype, so bf16 goes in as it is and its products
            # run in bf16 (a 2,048-token Qwen2.5-0.5B-shaped prefill, bf16: see bench/RESULTS.md).
            o = torch.nn.functional.scaled_dot_product_attention(
                qg.to(kg.dtype), kg, vg, attn_mask=self.stacked_mask(group), scale=scale
            )
        else:  # the shared prefix is visible to every query: one matmul for all rows, one joint softmax
            # fp32 throughout, as SDPA does inside: half-precision scores would round before the softmax
            qf = qg.float()
            scores = torch.matmul(qf, kg.transpose(2, 3).float()) * scale
            scores = scores.view(kv_heads, self.rows, group, self.queries, self.context)
            scores.masked_fill_(~self.mask, float("-inf"))
            kp = gather_rows(k_pool, self.prefix_index).view(kv_heads, self.prefix_len, head_dim)
            vp = gather_rows(v_pool, self.prefix_index).view(kv_heads, self.prefix_len, head_dim)
            prefix_scores = (
                torch.matmul(qf.reshape(kv_heads, -1, head_dim), kp.transpose(1, 2).float()) * scale
            )
            prefix_scores = prefix_scores.view(kv_heads, self.rows, group, self.queries, self.prefix_len)
            weights = torch.softmax(torch.cat([prefix_scores, scores], dim=-1), dim=-1)
            own = weights[..., self.prefix_len :].reshape(
                kv_heads, self.rows, group * self.queries, self.context
            )
            o = torch.matmul(own, vg.float())
            shared = weights[..., : self.prefix_len].reshape(kv_heads, -1, self.prefix_len)
            o += torch.matmul(shared, vp.float()).view_as(o)
        o = o.view(kv_heads, self.rows, group, self.queries, head_dim).transpose(1, 2)
        o = o.reshape(q_heads, self.rows * self.queries, head_dim).to(q.dtype)
        out.index_copy_(1, self.targets, o.index_select(1, self.valid))


def group_rows(layout: StepLayout, rows: list[int], pool: KVPool) -> list[RowGroup | CausalChunk]:
    """Long prompt chunks alone, in two parts (causal_chunk.py; SDPA's CPU kernel); of the other rows, those
    sharing a long prefix attend to it together (cascade), the rest by shape, prefix included."""
    groups: list[RowGroup | CausalChunk] = []
    if pool.device.type == "cpu":
        long_chunks = [r for r in rows if layout.query_len(r) >= LONG_CHUNK]
        groups += [CausalChunk.build(layout, r, pool) for r in long_chunks]
        rows = [r for r in rows if layout.query_len(r) < LONG_CHUNK]
    sharing: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        if layout.prefix_lens[r] >= CASCADE_MIN_PREFIX:
            sharing[layout.prefix_blocks[r][0]].append(r)  # a block belongs to one resident prefix only
    for first_block, members in list(sharing.items()):
        if len(members) < 2:
            del sharing[first_block]
            continue
        for part in _by_shape(layout, members, lambda r: layout.own_lens[r]):
            groups.append(_build_group(layout, part, pool, shared_prefix=members[0]))
    plain = [r for r in rows if not layout.prefix_lens[r] or layout.prefix_blocks[r][0] not in sharing]
    for part in _by_shape(layout, plain, layout.context_len):
        groups.append(_build_group(layout, part, pool))
    return groups


def _by_shape(layout: StepLayout, rows: list[int], context: Callable[[int], int]) -> list[list[int]]:
    """Split rows, sorted by shape, wherever a group's padded area would pass MAX_PADDING x its real work."""
    order = sorted(rows, key=lambda r: (layout.query_len(r), context(r)))
    parts: list[list[int]] = []
    current: list[int] = []
    real = 0
    for r in order:
        work = layout.query_len(r) * context(r)
        padded = (len(current) + 1) * work  # sorted: this row is the widest
        if current and padded > MAX_PADDING * (real + work):
            parts.append(current)
            current, real = [], 0
        current.append(r)
        real += work
    if current:
        parts.append(current)
    return parts


def _build_group(
    layout: StepLayout, rows: list[int], pool: KVPool, shared_prefix: int | None = None
) -> RowGroup:
    """`shared_prefix`: a row whose adapter prefix all of `rows` share (attended once, apart)."""
    device = layout.device

    def column(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)[:, None]

    query_lens = [layout.query_len(r) for r in rows]
    lengths = [layout.own_lens[r] if shared_prefix is not None else layout.context_len(r) for r in rows]
    queries, context = max(query_lens), max(lengths)
    query_len, length = column(query_lens), column(lengths)
    query_pos = torch.arange(queries, device=device)[None]
    real = query_pos < query_len  # [rows, queries]
    query_index = column([layout.query_starts[r] for r in rows]) + torch.where(real, query_pos, 0)
    valid = real.flatten().nonzero().flatten()
    keys = torch.arange(context, device=device)[None, None, :]
    # query i of a row sits at context index length - query_len + i; padded queries see the row's first key
    mask = (keys <= (length - query_len + query_pos)[:, :, None]) | (keys == 0)
    mask &= keys < length[:, :, None]
    heads = torch.arange(pool.shape.num_kv_heads, device=device)[:, None] * pool.keys[0].shape[1]
    slots = layout.context_slots(rows, context, with_prefix=shared_prefix is None)
    prefix_index = None
    if shared_prefix is not None:
        prefix_index = (heads + layout.prefix_slots(shared_prefix)[None]).flatten()
    return RowGroup(
        query_index.flatten(),
        (heads + slots.flatten()[None]).flatten(),
        mask[:, None],
        valid,
        query_index.flatten()[valid],
        len(rows),
        queries,
        context,
        prefix_index,
        layout.prefix_lens[shared_prefix] if shared_prefix is not None else 0,
    )


def attend_groups(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    groups: list[RowGroup | CausalChunk],
    scale: float,
    out: torch.Tensor,
) -> None:
    """q, out: [q_heads, N, head_dim]; the pools: [kv_heads, slots, head_dim]. Writes the groups' queries."""
    for group in groups:
        group.attend(q, k_pool, v_pool, scale, out)


def store(
    key: torch.Tensor, value: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor
) -> None:
    k_pool.index_copy_(1, slots, key)
    v_pool.index_copy_(1, slots, value)


class PortableBackend:
    """Every row through `group_rows` and SDPA: runs wherever torch does; the reference for the others."""

    name = "portable"
    store = staticmethod(store)
    forward = staticmethod(attend_groups)

    def build(self, layout: StepLayout, pool: KVPool) -> list[RowGroup | CausalChunk]:
        return group_rows(layout, list(range(layout.num_rows)), pool)
