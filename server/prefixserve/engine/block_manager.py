"""Which KV-pool blocks hold what: each row's own tokens, and each adapter prefix once for all its rows.

A row's context is its adapter's prefix (T tokens, in blocks shared by every row on that adapter version)
followed by its own tokens (in blocks of its own). A prefix stays resident while any row uses it; once
unused it is kept, evictable, until its blocks are needed (LRU), so the next request on it costs no copy.
Pure bookkeeping: no tensors. The scheduler is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class ResidentPrefix:
    slots: list[int]
    blocks: list[int]
    refs: int = 0


@dataclass
class RowBlocks:
    """A row's own blocks and the slots of its tokens, in order (block * block_size + offset)."""

    blocks: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    prefix_key: Hashable | None = None
    prefix_slots: list[int] = field(default_factory=list)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._prefixes: dict[Hashable, ResidentPrefix] = {}
        self._unused: OrderedDict[Hashable, None] = OrderedDict()  # resident, no row using it; LRU order

    # ----- capacity -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now, counting those of unused prefixes (evicted on demand)."""
        return len(self._free) + sum(len(self._prefixes[k].blocks) for k in self._unused)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def prefix_cost(self, key: Hashable | None, num_tokens: int) -> int:
        """Blocks that acquiring this prefix would take from the free pool (0 when it is resident)."""
        if key is None or num_tokens == 0:
            return 0
        prefix = self._prefixes.get(key)
        if prefix is None:
            return blocks_for(num_tokens, self.block_size)
        return len(prefix.blocks) if key in self._unused else 0

    def _take(self, n: int) -> list[int] | None:
        if n > self.num_free:
            return None
        while len(self._free) < n:  # evict the least recently used unused prefixes
            key, _ = self._unused.popitem(last=False)
            self._free.extend(self._prefixes.pop(key).blocks)
        return [self._free.pop() for _ in range(n)]

    # ----- prefixes -------------------------------------------------------------------------------------
    def acquire_prefix(self, row: RowBlocks, key: Hashable, num_tokens: int) -> list[int] | None:
        """Point `row` at the prefix `key`. Returns the slots to fill when it was not resident ([] when it
        was); None when there are not enough free blocks (nothing changes then)."""
        prefix = self._prefixes.get(key)
        fill: list[int] = []
        if prefix is None:
            blocks = self._take(blocks_for(num_tokens, self.block_size))
            if blocks is None:
                return None
            slots = [b * self.block_size + o for b in blocks for o in range(self.block_size)][:num_tokens]
            prefix = self._prefixes[key] = ResidentPrefix(slots, blocks)
            fill = slots
        self._unused.pop(key, None)
        prefix.refs += 1
        row.prefix_key, row.prefix_slots = key, prefix.slots
        return fill

    def _release_prefix(self, row: RowBlocks) -> None:
        if row.prefix_key is None:
            return
        prefix = self._prefixes[row.prefix_key]
        prefix.refs -= 1
        if prefix.refs == 0:
            self._unused[row.prefix_key] = None
        row.prefix_key, row.prefix_slots = None, []

    # ----- rows -----------------------------------------------------------------------------------------
    def grow(self, row: RowBlocks, num_tokens: int) -> bool:
        """Make `row` hold `num_tokens` own tokens. False (and no change) when the pool is out of blocks."""
        missing = blocks_for(num_tokens, self.block_size) - len(row.blocks)
        if missing <= 0:
            return True
        blocks = self._take(missing)
        if blocks is None:
            return False
        row.blocks.extend(blocks)
        row.slots.extend(b * self.block_size + o for b in blocks for o in range(self.block_size))
        return True

    def free(self, row: RowBlocks) -> None:
        """Give back a row's own blocks and its hold on its prefix (finished or preempted)."""
        self._free.extend(reversed(row.blocks))
        row.blocks.clear()
        row.slots.clear()
        self._release_prefix(row)
