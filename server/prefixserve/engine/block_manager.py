"""Which KV-pool blocks hold what: each row's own tokens, and each adapter prefix once for all its rows.

A row's context is its adapter's prefix (T tokens, in blocks shared by every row on that adapter version)
followed by its own tokens (in blocks of its own). A prefix stays resident while any row uses it; once
unused it is kept, evictable, until its blocks are needed (LRU), so the next request on it costs no copy.

The pool is also the prompt cache: a row's full blocks are registered under their hash chain
(prefix_cache.py) once computed, and stay in the pool after the row ends. A new row whose tokens begin with
the same chain takes those blocks (ref-counted, read-only: a row only ever writes past its last full cached
block) and computes the rest. Unreferenced cached blocks are evicted LRU, a chain's last block first, only
when blocks are needed: the cache has no budget of its own and never causes a preemption.
Pure bookkeeping: no tensors. The scheduler is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class ResidentPrefix:
    blocks: list[int]
    num_tokens: int
    refs: int = 0


@dataclass
class RowBlocks:
    """A row's own blocks, in order (token i of the row is in slot blocks[i // size] * size + i % size), and
    the blocks of its adapter prefix (its first `prefix_len` slots, counted the same way)."""

    blocks: list[int] = field(default_factory=list)
    prefix_key: Hashable | None = None
    prefix_blocks: list[int] = field(default_factory=list)
    prefix_len: int = 0
    num_hashed: int = 0  # leading blocks already looked up in or offered to the cache


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._prefixes: dict[Hashable, ResidentPrefix] = {}
        self._unused: OrderedDict[Hashable, None] = OrderedDict()  # resident, no row using it; LRU order
        self._unused_blocks = 0  # their blocks, kept as a count: num_free is read per waiting row per step
        # The prompt cache: chain hash -> block and back; rows holding each shared block; cached blocks no
        # row holds, oldest first (a chain is released last block first, so its leaf goes before its root).
        self._cached: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    # ----- capacity -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now, counting those of unused prefixes (evicted on demand)."""
        return len(self._free) + len(self._evictable) + self._unused_blocks

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prompt cache, held by rows or not."""
        return len(self._cached)

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
        while len(self._free) < n and self._evictable:  # cached blocks first: leaves of the adapters' chains
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self._free.append(block)
        while len(self._free) < n:  # then the least recently used unused prefixes
            key, _ = self._unused.popitem(last=False)
            blocks = self._prefixes.pop(key).blocks
            self._unused_blocks -= len(blocks)
            self._free.extend(blocks)
        return [self._free.pop() for _ in range(n)]

    # ----- the prompt cache -----------------------------------------------------------------------------
    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest leading run of `hashes` (a row's full blocks, in order)."""
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def match_cost(self, blocks: list[int]) -> int:
        """Free capacity that taking these cached blocks uses up: those no row holds count as free now."""
        return sum(1 for b in blocks if b in self._evictable)

    def take_cached(self, row: RowBlocks, blocks: list[int]) -> None:
        """Start an empty `row` with these cached blocks (from `match`) as its first tokens."""
        assert not row.blocks, "cached blocks go at the start of a row"
        for block in blocks:
            self._evictable.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        row.blocks.extend(blocks)
        row.num_hashed = len(blocks)

    def offer(self, row: RowBlocks, hashes: list[bytes]) -> None:
        """Register the row's full, computed blocks `hashes` covers (from `row.num_hashed` on). A block whose
        hash is cached already (another row computed the same tokens) stays the row's own."""
        for i in range(row.num_hashed, len(hashes)):
            h, block = hashes[i], row.blocks[i]
            if h not in self._cached and block not in self._hash_of:
                self._cached[h], self._hash_of[block] = block, h
                self._refs[block] = self._refs.get(block, 0) + 1
        row.num_hashed = max(row.num_hashed, len(hashes))

    def reset_cache(self) -> int:
        """Forget every cached block (rows keep theirs, as their own); returns how many were registered."""
        count = len(self._cached)
        self._free.extend(self._evictable)
        for block in self._evictable:
            self._refs.pop(block, None)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()
        return count

    # ----- prefixes -------------------------------------------------------------------------------------
    def acquire_prefix(self, row: RowBlocks, key: Hashable, num_tokens: int) -> list[int] | None:
        """Point `row` at the prefix `key`. Returns the blocks to fill when it was not resident ([] when it
        was); None when there are not enough free blocks (nothing changes then)."""
        prefix = self._prefixes.get(key)
        fill: list[int] = []
        if prefix is None:
            blocks = self._take(blocks_for(num_tokens, self.block_size))
            if blocks is None:
                return None
            prefix = self._prefixes[key] = ResidentPrefix(blocks, num_tokens)
            fill = blocks
        elif key in self._unused:
            del self._unused[key]
            self._unused_blocks -= len(prefix.blocks)
        prefix.refs += 1
        row.prefix_key, row.prefix_blocks, row.prefix_len = key, prefix.blocks, prefix.num_tokens
        return fill

    def _release_prefix(self, row: RowBlocks) -> None:
        if row.prefix_key is None:
            return
        prefix = self._prefixes[row.prefix_key]
        prefix.refs -= 1
        if prefix.refs == 0:
            self._unused[row.prefix_key] = None
            self._unused_blocks += len(prefix.blocks)
        row.prefix_key, row.prefix_blocks, row.prefix_len = None, [], 0

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
        return True

    def free(self, row: RowBlocks) -> None:
        """Give back a row's blocks and its hold on its prefix (finished or preempted). Cached blocks stay in
        the pool until evicted; the last of a row goes first, since nothing can reach it without the others."""
        for block in reversed(row.blocks):
            refs = self._refs.get(block)
            if refs is None:
                self._free.append(block)
            elif refs > 1:
                self._refs[block] = refs - 1
            else:
                del self._refs[block]
                if block in self._hash_of:
                    self._evictable[block] = None
                else:  # registered once, then forgotten by a reset
                    self._free.append(block)
        row.blocks.clear()
        row.num_hashed = 0
        self._release_prefix(row)
