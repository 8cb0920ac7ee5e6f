"""The KV block bookkeeping, without a model: prefixes stored once and shared, LRU reuse, no partial changes."""

from __future__ import annotations

import random

from prefixserve.engine.block_manager import BlockManager, RowBlocks


def test_rows_on_one_adapter_share_one_copy_of_its_prefix():
    blocks = BlockManager(num_blocks=100, block_size=16)
    rows = [RowBlocks() for _ in range(64)]
    fills = [blocks.acquire_prefix(row, "cartridge", 512) for row in rows]
    assert len(fills[0]) == 512 // 16 and all(
        f == [] for f in fills[1:]
    )  # written once, then only pointed at
    assert all(row.prefix_blocks is rows[0].prefix_blocks and row.prefix_len == 512 for row in rows)
    assert blocks.num_used == 512 // 16


def test_an_unused_prefix_stays_resident_until_its_blocks_are_needed():
    blocks = BlockManager(num_blocks=6, block_size=4)
    a, b = RowBlocks(), RowBlocks()
    assert blocks.acquire_prefix(a, "old", 8) and blocks.acquire_prefix(b, "new", 8)
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free == 6  # unused prefixes count as free ...
    again = RowBlocks()
    assert blocks.acquire_prefix(again, "old", 8) == []  # ... and a request on one costs no copy
    row = RowBlocks()
    assert blocks.grow(row, 16)  # needs 4 blocks: "new" (unused) is evicted, "old" (in use) is not
    assert blocks.prefix_cost("new", 8) == 2 and blocks.prefix_cost("old", 8) == 0


def test_least_recently_used_prefix_is_evicted_first():
    blocks = BlockManager(num_blocks=4, block_size=4)
    for key in ("first", "second"):
        row = RowBlocks()
        blocks.acquire_prefix(row, key, 4)
        blocks.free(row)
    row = RowBlocks()
    assert blocks.grow(row, 12)  # 3 blocks: both free blocks and one prefix's
    assert blocks.acquire_prefix(RowBlocks(), "second", 4) == []  # kept: used more recently, no copy needed
    assert blocks.acquire_prefix(RowBlocks(), "first", 4) is None  # evicted, and no block left to reload it


def test_growing_past_the_pool_changes_nothing():
    blocks = BlockManager(num_blocks=3, block_size=4)
    row = RowBlocks()
    assert blocks.grow(row, 8)
    assert not blocks.grow(row, 17)  # 5 blocks: 2 more than exist
    assert len(row.blocks) == 2 and blocks.num_free == 1
    other = RowBlocks()
    assert blocks.acquire_prefix(other, "big", 9) is None and other.prefix_key is None


def test_own_blocks_are_apart_from_the_prefix_s_and_freeing_returns_everything():
    blocks = BlockManager(num_blocks=8, block_size=4)
    row = RowBlocks()
    blocks.acquire_prefix(row, "p", 3)
    blocks.grow(row, 6)
    assert len(row.blocks) == 2 and row.prefix_len == 3 and len(row.prefix_blocks) == 1
    assert not set(row.blocks) & set(row.prefix_blocks)
    blocks.free(row)
    assert blocks.num_free == 8 and row.blocks == [] and row.prefix_key is None


def test_the_free_count_stays_true_through_any_sequence_of_operations():
    """num_free is kept as a running count (it is read for every waiting row every step); after each of a
    few thousand random acquires, grows and frees it equals the count taken from the blocks themselves, and
    every block is in exactly one place."""
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=40, block_size=4)
    rows: list[RowBlocks] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.4 or not rows:
            row = RowBlocks()
            if blocks.acquire_prefix(row, f"p{rng.randrange(12)}", rng.randrange(1, 13)) is not None:
                rows.append(row)
        elif op < 0.7:
            blocks.grow(rng.choice(rows), rng.randrange(1, 24))
        else:
            blocks.free(rows.pop(rng.randrange(len(rows))))
        unused = [b for key in blocks._unused for b in blocks._prefixes[key].blocks]
        assert blocks.num_free == len(blocks._free) + len(blocks._evictable) + len(unused)
        in_use = [b for p in blocks._prefixes.values() for b in p.blocks] + [
            b for r in rows for b in r.blocks
        ]
        assert sorted(in_use + blocks._free) == list(range(40))
