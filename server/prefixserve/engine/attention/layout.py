"""A step's rows as attention sees them: where each row's queries are, and which blocks hold its context.

Built once per step by the model runner from the block manager's block lists (one entry per block, never one
per token), read by every backend. A row's context is its adapter prefix (`prefix_lens[r]` slots in
`prefix_blocks[r]`, shared with every row on that adapter) followed by its own tokens (`own_lens[r]` slots in
`own_blocks[r]`, this step's new ones last). The host lists are for decisions made once per step (which rows
to group); the tables are what slots are computed from, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixserve.engine.kv_cache import block_slots


def padded_table(blocks: list[list[int]], device: torch.device) -> torch.Tensor:
    """[rows, max blocks] (at least one column), 0 past a row's own blocks (never read: lengths mask them)."""
    width = max(1, max((len(b) for b in blocks), default=0))
    return torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.long, device=device)


@dataclass
class StepLayout:
    block_size: int
    query_starts: list[int]  # [rows + 1]: row r's new tokens are flat tokens query_starts[r] to [r + 1]
    prefix_lens: list[int]  # [rows] adapter prefix slots (0: the base model)
    own_lens: list[int]  # [rows] own tokens attended over, this step's included
    prefix_blocks: list[list[int]]
    own_blocks: list[list[int]]
    prefix_table: torch.Tensor  # [rows, max prefix blocks] on the device
    block_table: torch.Tensor  # [rows, max own blocks] on the device

    @classmethod
    def build(
        cls,
        block_size: int,
        query_starts: list[int],
        prefix_lens: list[int],
        own_lens: list[int],
        prefix_blocks: list[list[int]],
        own_blocks: list[list[int]],
        device: torch.device,
    ) -> StepLayout:
        return cls(
            block_size,
            query_starts,
            prefix_lens,
            own_lens,
            prefix_blocks,
            own_blocks,
            padded_table(prefix_blocks, device),
            padded_table(own_blocks, device),
        )

    @property
    def num_rows(self) -> int:
        return len(self.own_lens)

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    def query_len(self, row: int) -> int:
        return self.query_starts[row + 1] - self.query_starts[row]

    def context_len(self, row: int) -> int:
        return self.prefix_lens[row] + self.own_lens[row]

    def context_slots(self, rows: list[int], width: int, with_prefix: bool = True) -> torch.Tensor:
        """[len(rows), width]: the slot of each context position of `rows`, adapter prefix first (unless
        `with_prefix` is False: own tokens only); past a row's context, its first slot again (padding that the
        caller masks)."""
        device = self.device
        index = torch.tensor(rows, dtype=torch.long, device=device)
        prefix_lens = [self.prefix_lens[r] if with_prefix else 0 for r in rows]
        start = torch.tensor(prefix_lens, dtype=torch.long, device=device)[:, None]
        length = (
            start + torch.tensor([self.own_lens[r] for r in rows], dtype=torch.long, device=device)[:, None]
        )
        position = torch.arange(width, device=device)[None]
        position = torch.where(position < length, position, 0)
        own = block_slots(self.block_table.index_select(0, index), self.block_size)
        slots = own.gather(1, (position - start).clamp(0, own.shape[1] - 1))
        if any(prefix_lens):
            prefix = block_slots(self.prefix_table.index_select(0, index), self.block_size)
            from_prefix = prefix.gather(1, position.clamp(max=prefix.shape[1] - 1))
            slots = torch.where(position < start, from_prefix, slots)
        return slots

    def flat_context_slots(self, rows: list[int]) -> torch.Tensor:
        """The contexts of `rows`, one after another (prefix first): [sum of their context lengths]."""
        lengths = torch.tensor([self.context_len(r) for r in rows], device=self.device)
        width = int(max((self.context_len(r) for r in rows), default=0))
        padded = self.context_slots(rows, width)
        return padded[torch.arange(width, device=self.device)[None] < lengths[:, None]]

    def prefix_slots(self, row: int) -> torch.Tensor:
        """[prefix_lens[row]] the slots of the row's adapter prefix."""
        return block_slots(self.prefix_table[row], self.block_size)[: self.prefix_lens[row]]
