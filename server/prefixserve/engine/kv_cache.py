"""The KV cache: one pool of fixed-size blocks per layer, sized in bytes (`--kv-cache-mb`), shared by all rows.

A slot is one token's keys and values in one block: slot = block * block_size + offset. Each layer's keys
(and values) are one tensor [kv_heads, slots, head_dim], so a batch writes its new tokens with one
`index_copy_` and attention gathers exactly the slots a row holds, wherever its blocks are, already laid out
head by head as the attention matmuls want them. Which blocks
belong to which row or adapter prefix is the block manager's business; this class only holds the memory.
"""

from __future__ import annotations

import torch

from prefixserve.adapters.kv_prefix import KVShape


def block_slots(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slots of `blocks` ([..., n] block ids): [..., n * block_size], in order."""
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[..., None] * block_size + offsets).flatten(-2)


def bytes_per_token(shape: KVShape, dtype: torch.dtype) -> int:
    return shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * torch.finfo(dtype).bits // 8


class KVPool:
    def __init__(
        self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        size = (shape.num_kv_heads, num_blocks * block_size, shape.head_dim)
        # Allocated whole and written once, up front: running out of memory at start-up beats failing later,
        # and the pool is the prompt cache, so it fills up in normal use anyway. Left uninitialized, the OS
        # commits its pages only as blocks are first used: the soak's resident set grew 549 -> 672 MB in 10
        # minutes that way, and a container sized by its start-up memory would be killed hours later.
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]

    @classmethod
    def sized(
        cls, shape: KVShape, megabytes: float, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVPool:
        per_block = bytes_per_token(shape, dtype) * block_size
        num_blocks = int(megabytes * 2**20) // per_block
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_mb={megabytes:g} holds fewer than 2 blocks of {block_size} tokens "
                f"({per_block / 2**20:.2f} MB each) for this model; raise --kv-cache-mb"
            )
        return cls(shape, num_blocks, block_size, dtype, device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write_prefix(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Copy an adapter prefix ([layers, 2, kv_heads, T, head_dim]) into the first T slots of `blocks`."""
        index = block_slots(torch.tensor(blocks, device=self.device), self.block_size).flatten()[
            : kv.shape[3]
        ]
        for layer in range(self.shape.num_layers):
            self.keys[layer].index_copy_(1, index, kv[layer, 0].to(self.dtype))
            self.values[layer].index_copy_(1, index, kv[layer, 1].to(self.dtype))


def gather_rows(layer_pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of one layer's keys or values, the pool seen as [kv_heads * slots, head_dim] (index: head * slots
    + slot): gathering along dim 0 of the flattened pool measured twice as fast as along dim 1 (CPU)."""
    return layer_pool.view(-1, layer_pool.shape[-1]).index_select(0, index)
