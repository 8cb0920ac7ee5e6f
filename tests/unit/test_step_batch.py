"""A step's inputs without a model: ModelRunner.prepare turns scheduled rows into tensors computed from block
tables (positions by PEFT's rule, each new token's pool slot, where logits are read), and StepLayout gives each
row's context slots (its adapter prefix's first, then its own), written out here token by token to compare."""

from __future__ import annotations

import torch

from prefixserve.adapters.kv_prefix import KVShape, LoadedPrefix
from prefixserve.engine.block_manager import BlockManager, RowBlocks
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.scheduler import ScheduledRow, SchedulerOutput
from prefixserve.engine.sequence import SamplingParams, Sequence

BLOCK = 4


def slots_of(blocks: list[int], count: int) -> list[int]:
    return [b * BLOCK + o for b in blocks for o in range(BLOCK)][:count]


def test_prepare_computes_positions_slots_and_contexts_from_block_tables():
    pool = KVPool(KVShape(1, 1, 2, 2), 32, BLOCK, torch.float32, torch.device("cpu"))
    blocks = BlockManager(32, BLOCK)
    other = RowBlocks()  # another row's blocks, taken first: the rows below do not start at block 0
    blocks.grow(other, 3)
    adapter = LoadedPrefix(
        "ns", ("a",), ("a",), torch.zeros(1, 2, 1, 6, 2)
    )  # T=6: one full block, one partial
    decoding = Sequence(list(range(10, 19)), SamplingParams(), adapter, lambda e: None)
    chunk = Sequence(list(range(20, 31)), SamplingParams(prompt_logprobs=0), adapter, lambda e: None)
    base = Sequence(list(range(40, 45)), SamplingParams(), None, lambda e: None)
    out = SchedulerOutput()
    for seq, computed, n in ((decoding, 9, 1), (chunk, 2, 5), (base, 0, 5)):
        if seq is decoding:
            seq.append_output(99)
        if seq.prefix is not None:
            fill = blocks.acquire_prefix(seq.blocks, seq.prefix_key, seq.num_virtual_tokens)
            if fill:
                out.prefix_fills.append((fill, seq.prefix))
        assert blocks.grow(seq.blocks, computed + n)
        seq.num_computed = computed
        out.rows.append(ScheduledRow(seq, n))
    batch = ModelRunner(None, pool).prepare(out)  # no kernels: the portable backend

    expect_ids, expect_positions, expect_slots, contexts = [], [], [], []
    for row in out.rows:
        seq, n, done = row.seq, row.num_tokens, row.seq.num_computed
        own = slots_of(seq.blocks.blocks, done + n)
        expect_ids += seq.token_ids[done : done + n]
        expect_positions += range(seq.num_virtual_tokens + done, seq.num_virtual_tokens + done + n)
        expect_slots += own[done:]
        contexts.append(slots_of(seq.blocks.prefix_blocks, seq.blocks.prefix_len) + own)
    assert batch.input_ids.tolist() == expect_ids
    assert batch.positions.tolist() == expect_positions
    assert batch.slot_mapping.tolist() == expect_slots
    # the decoding row and the base row sample (their last token is in); the chunk scores prompt tokens 2-6
    assert batch.logits_indices.tolist() == [0, 10, 1, 2, 3, 4, 5] and batch.num_sampling == 2
    assert [len(f[0]) for f in batch.prefix_fills] == [2]  # one copy of the adapter's prefix, two blocks
    layout = batch.layout
    assert layout.flat_context_slots([0, 1, 2]).tolist() == sum(contexts, [])
    padded = layout.context_slots([2, 0], 16)
    for i, r in enumerate([2, 0]):
        assert padded[i].tolist() == contexts[r] + [contexts[r][0]] * (16 - len(contexts[r]))
    own_only = layout.context_slots([1], 8, with_prefix=False)[0].tolist()
    assert own_only == slots_of(chunk.blocks.blocks, 7) + [slots_of(chunk.blocks.blocks, 1)[0]]
    assert not set(slots_of(other.blocks, 3)) & set(batch.slot_mapping.tolist())
