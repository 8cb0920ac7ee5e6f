"""Attention over the KV block pool, plugged into transformers' attention interface.

The engine runs a step as one flat sequence of tokens from many rows (no padding): `input_ids` [1, N]. Each
layer's attention module computes queries, keys and values (with its own rotary embedding, norms, biases) and
calls the registered function below, which writes the new keys/values into the pool and attends, for every
row, over exactly the slots that row holds (its adapter prefix, then its own tokens).

Rows are grouped by shape before the step (`group_rows`): rows of similar query and context lengths share one
gather from the pool and one SDPA call over [rows, heads, queries, context], masked per row. A group is closed
as soon as its padded area would exceed its real work by a quarter, so a short row never pays for the batch's
longest one; a batch of similar rows (the common decode step) is one group, one call per layer.

Decoding rows (one query token each) go instead, where the native kernels are built (native.py), to one call
of `paged_decode` per layer for all of them: it reads each row's slots in the pool in place, in the pool's
dtype, with no gather, no cast and no padding (`DecodeRows`). Rows whose contexts begin with the same slots
(one adapter and one system prompt, held once in the prompt cache) form a group whose shared slots are read
once for all its rows, with the same bits as when each row reads them alone.

Calls without a batch (from_text, the self-check's reference) fall through to transformers' SDPA, so the one
loaded model serves both paths.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from prefixserve.engine.kv_cache import KVPool

ATTN_IMPLEMENTATION = "prefixserve_paged"
BATCH_KWARG = "prefixserve_batch"
MAX_PADDING = 1.25  # a group's padded area (rows x queries x context) may exceed its real work by this much
# A prefix this long, held by two or more rows of a step, is attended once for all of them (cascade). Shorter
# ones ride in each row's context: splitting a batch by adapter would cost more calls than it saves.
CASCADE_MIN_PREFIX = 64
SHARED_QUANTUM = 16  # the decode kernel reads shared slots in whole vectors: counts are multiples of this
MAX_SHARING_ROWS = 8  # rows per group of the decode kernel: one group is one task per kv head (parallelism)


@dataclass(frozen=True)
class RowAttention:
    """One row of a step: its queries are flat tokens [query_start, query_start + query_len) and it attends
    over its adapter prefix's slots, then its own (the new tokens last)."""

    query_start: int
    query_len: int
    prefix_slots: list[int]
    own_slots: list[int]


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


def group_rows(rows: list[RowAttention], pool: KVPool) -> list[RowGroup]:
    """Rows sharing a long prefix attend to it together (cascade); the rest by shape, prefix included."""
    sharing: dict[int, list[RowAttention]] = defaultdict(list)
    for row in rows:
        if len(row.prefix_slots) >= CASCADE_MIN_PREFIX:
            sharing[row.prefix_slots[0]].append(row)  # a slot belongs to one resident prefix only
    groups = []
    for first_slot, members in list(sharing.items()):
        if len(members) < 2:
            del sharing[first_slot]
            continue
        for part in _by_shape(members, lambda r: len(r.own_slots)):
            groups.append(_build_group(part, pool, shared_prefix=members[0].prefix_slots))
    plain = [r for r in rows if not r.prefix_slots or r.prefix_slots[0] not in sharing]
    for part in _by_shape(plain, lambda r: len(r.prefix_slots) + len(r.own_slots)):
        groups.append(_build_group(part, pool))
    return groups


def _by_shape(rows: list[RowAttention], context: Callable[[RowAttention], int]) -> list[list[RowAttention]]:
    """Split rows, sorted by shape, wherever a group's padded area would pass MAX_PADDING x its real work."""
    order = sorted(rows, key=lambda r: (r.query_len, context(r)))
    parts: list[list[RowAttention]] = []
    current: list[RowAttention] = []
    for row in order:
        candidate = current + [row]
        padded = len(candidate) * row.query_len * context(row)  # sorted: this row is the widest
        real = sum(r.query_len * context(r) for r in candidate)
        if current and padded > MAX_PADDING * real:
            parts.append(current)
            candidate = [row]
        current = candidate
    if current:
        parts.append(current)
    return parts


def _build_group(rows: list[RowAttention], pool: KVPool, shared_prefix: list[int] | None = None) -> RowGroup:
    device = pool.device
    contexts = [r.own_slots if shared_prefix else r.prefix_slots + r.own_slots for r in rows]
    queries = max(r.query_len for r in rows)
    context = max(len(c) for c in contexts)
    query_index, context_index, valid, targets = [], [], [], []
    for i, (r, slots) in enumerate(zip(rows, contexts, strict=True)):
        own = list(range(r.query_start, r.query_start + r.query_len))
        query_index += own + [r.query_start] * (queries - r.query_len)
        context_index += slots + [slots[0]] * (context - len(slots))
        valid += range(i * queries, i * queries + r.query_len)
        targets += own
    lengths = torch.tensor([len(c) for c in contexts], device=device)[:, None, None]
    query_lens = torch.tensor([r.query_len for r in rows], device=device)[:, None, None]
    keys = torch.arange(context, device=device)[None, None, :]
    query_pos = torch.arange(queries, device=device)[None, :, None]
    # query i of a row sits at context index length - query_len + i; padded queries see the row's first key
    mask = (keys <= lengths - query_lens + query_pos) | (keys == 0)
    mask &= keys < lengths

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    # Gathering along dim 0 of the flattened pool is twice as fast as along dim 1 (measured, CPU).
    slots = pool.keys[0].shape[1]
    heads = torch.arange(pool.shape.num_kv_heads, device=device)[:, None] * slots
    return RowGroup(
        tensor(query_index),
        (heads + tensor(context_index)[None]).flatten(),
        mask[:, None],
        tensor(valid),
        tensor(targets),
        len(rows),
        queries,
        context,
        None if shared_prefix is None else (heads + tensor(shared_prefix)[None]).flatten(),
        len(shared_prefix or ()),
    )


@dataclass
class DecodeRows:
    """Rows with one query each, attended by the native `paged_decode` straight from the pool."""

    op: Callable[..., torch.Tensor]  # torch.ops.prefixserve.paged_decode
    tokens: torch.Tensor  # [rows] the flat token of each row's query
    slots: torch.Tensor  # [sum of contexts] each row's slots, its prefix's first, then its own
    starts: torch.Tensor  # [rows + 1] where each row's slots begin
    groups: torch.Tensor  # [groups + 1] runs of rows whose contexts begin with the same slots ...
    shared: torch.Tensor  # [groups] ... and how many: read once per group (a multiple of SHARED_QUANTUM)


def decode_rows(rows: list[RowAttention], pool: KVPool, op: Callable[..., torch.Tensor]) -> DecodeRows:
    """Rows whose contexts begin with the same slots (rows on one adapter; rows whose prompts start with the
    same cached blocks: one system prompt) are grouped, and the kernel reads those slots once per group."""
    contexts = sorted((r.prefix_slots + r.own_slots, r.query_start) for r in rows)  # shared runs adjacent
    slots: list[int] = []
    starts, groups, shared = [0], [0], []
    leader: list[int] = []
    common = 0  # slots every row of the current group shares with its first row (a multiple of the quantum)
    for i, (context, _) in enumerate(contexts):
        if i > groups[-1]:
            joined = 0
            if (
                i - groups[-1] < MAX_SHARING_ROWS
                and context[:CASCADE_MIN_PREFIX] == leader[:CASCADE_MIN_PREFIX]
            ):
                joined = min(common, _common_length(leader, context[:-1]) // SHARED_QUANTUM * SHARED_QUANTUM)
            if joined >= CASCADE_MIN_PREFIX:
                common = joined
            else:
                shared.append(common if i - groups[-1] > 1 else 0)
                groups.append(i)
        if i == groups[-1]:
            leader = context
            common = (len(context) - 1) // SHARED_QUANTUM * SHARED_QUANTUM  # its last slot is its own
        slots += context
        starts.append(len(slots))
    if contexts:
        shared.append(common if len(contexts) - groups[-1] > 1 else 0)
        groups.append(len(contexts))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=pool.device)

    return DecodeRows(
        op,
        tensor([q for _, q in contexts]),
        tensor(slots),
        tensor(starts),
        tensor(groups),
        tensor(shared),
    )


def _common_length(a: list[int], b: list[int]) -> int:
    """How many leading entries `a` and `b` have in common (bisection over slice comparisons, done in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class AttentionBatch:
    """Where one step's tokens go and how rows attend; built once per step, used by every layer."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [N] slot of each new token
    groups: list[RowGroup]
    decode: DecodeRows | None = None


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
    k_pool.index_copy_(1, batch.slot_mapping, key[0].to(k_pool.dtype))
    v_pool.index_copy_(1, batch.slot_mapping, value[0].to(v_pool.dtype))
    q = query[0]  # [q_heads, N, head_dim]
    q_heads, _, head_dim = q.shape
    kv_heads = k_pool.shape[0]
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    out = torch.empty_like(q)
    if (d := batch.decode) is not None:
        rows_q = q.index_select(1, d.tokens).transpose(0, 1).contiguous()  # [rows, q_heads, head_dim]
        o = d.op(rows_q.to(k_pool.dtype), k_pool, v_pool, d.slots, d.starts, d.groups, d.shared, scale)
        out.index_copy_(1, d.tokens, o.transpose(0, 1).to(q.dtype))
    for g in batch.groups:
        # [kv_heads, rows, group * queries, head_dim]: the query heads that share a kv head, stacked
        qg = q.index_select(1, g.query_index).view(kv_heads, group, g.rows, g.queries, head_dim)
        qg = qg.transpose(1, 2).reshape(kv_heads, g.rows, group * g.queries, head_dim)
        kg = (
            k_pool.view(-1, head_dim)
            .index_select(0, g.context_index)
            .view(kv_heads, g.rows, g.context, head_dim)
        )
        vg = (
            v_pool.view(-1, head_dim)
            .index_select(0, g.context_index)
            .view(kv_heads, g.rows, g.context, head_dim)
        )
        # fp32 throughout, as SDPA accumulates: half-precision scores would round before the softmax
        qf = qg.float()
        if g.prefix_index is None:
            # SDPA's fused CPU kernel: no [queries x context] score matrix per head is written out (a 2,048-token
            # prompt's prefill attention measured 2.8x faster than matmul + masked softmax + matmul)
            o = torch.nn.functional.scaled_dot_product_attention(
                qf, kg.float(), vg.float(), attn_mask=g.stacked_mask(group), scale=scale
            )
        else:  # the shared prefix is visible to every query: one matmul for all rows, one joint softmax
            scores = torch.matmul(qf, kg.transpose(2, 3).float()) * scale
            scores = scores.view(kv_heads, g.rows, group, g.queries, g.context)
            scores.masked_fill_(~g.mask, float("-inf"))
            kp = (
                k_pool.view(-1, head_dim)
                .index_select(0, g.prefix_index)
                .view(kv_heads, g.prefix_len, head_dim)
            )
            vp = (
                v_pool.view(-1, head_dim)
                .index_select(0, g.prefix_index)
                .view(kv_heads, g.prefix_len, head_dim)
            )
            prefix_scores = (
                torch.matmul(qf.reshape(kv_heads, -1, head_dim), kp.transpose(1, 2).float()) * scale
            )
            prefix_scores = prefix_scores.view(kv_heads, g.rows, group, g.queries, g.prefix_len)
            weights = torch.softmax(torch.cat([prefix_scores, scores], dim=-1), dim=-1)
            own = weights[..., g.prefix_len :].reshape(kv_heads, g.rows, group * g.queries, g.context)
            o = torch.matmul(own, vg.float())
            shared = weights[..., : g.prefix_len].reshape(kv_heads, -1, g.prefix_len)
            o += torch.matmul(shared, vp.float()).view_as(o)
        o = o.view(kv_heads, g.rows, group, g.queries, head_dim).transpose(1, 2)
        o = o.reshape(q_heads, g.rows * g.queries, head_dim).to(q.dtype)
        out.index_copy_(1, g.targets, o.index_select(1, g.valid))
    return out.transpose(0, 1)[None], None


def register() -> None:
    """Make `attn_implementation=ATTN_IMPLEMENTATION` available; its masks (for the SDPA fall-through) are SDPA's."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
