"""A preallocated KV cache with one row (slot) per running sequence.

Row r of every layer holds its sequence's keys/values at positions [0, length): the adapter prefix at
[0, T), then the prompt and generated tokens. A token's cache index therefore equals its position id,
which is PEFT's rule (the first prompt token has position T). Rows are kept compact (rows 0..n-1 are
the running ones), so a batch reads a plain slice, never a gathered copy.
"""

from __future__ import annotations

import torch

from prefixserve.adapters.format import KVShape

_GROWTH_QUANTUM = 64


class SlotKVCache:
    def __init__(
        self,
        shape: KVShape,
        max_rows: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_length: int = 256,
    ) -> None:
        self.shape = shape
        self.max_rows = max_rows
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ensure_capacity(min(initial_length, max_length))

    def ensure_capacity(self, length: int) -> None:
        """Grow the position dimension (amortized doubling) so that `length` positions fit."""
        if length <= self.capacity:
            return
        new_capacity = min(
            self.max_length, max(2 * self.capacity, -(-length // _GROWTH_QUANTUM) * _GROWTH_QUANTUM)
        )
        if new_capacity < length:
            raise ValueError(f"a row of {length} positions exceeds the cache's maximum of {self.max_length}")
        # Zeros, not empty: masked keys still enter the softmax-weighted sum as 0 * value, and 0 * NaN is NaN.
        size = (self.max_rows, self.shape.num_kv_heads, new_capacity, self.shape.head_dim)
        new_keys = [
            torch.zeros(size, dtype=self.dtype, device=self.device) for _ in range(self.shape.num_layers)
        ]
        new_values = [
            torch.zeros(size, dtype=self.dtype, device=self.device) for _ in range(self.shape.num_layers)
        ]
        if self.capacity:
            for old, new in zip(self.keys + self.values, new_keys + new_values, strict=True):
                new[:, :, : self.capacity].copy_(old)
        self.keys, self.values, self.capacity = new_keys, new_values, new_capacity

    def write_prefix(self, row: int, kv: torch.Tensor) -> None:
        """Copy an adapter prefix ([layers, 2, heads, T, head_dim]) into positions [0, T) of `row`."""
        t = kv.shape[3]
        for layer in range(self.shape.num_layers):
            self.keys[layer][row, :, :t].copy_(kv[layer, 0])
            self.values[layer][row, :, :t].copy_(kv[layer, 1])

    def move_row(self, src: int, dst: int, length: int) -> None:
        for tensor in self.keys + self.values:
            tensor[dst, :, :length].copy_(tensor[src, :, :length])

    def batch(self, rows: slice | torch.Tensor, write_index: torch.Tensor, read_length: int) -> BatchKV:
        return BatchKV(self, rows, write_index, read_length)


class BatchKV:
    """The cache as one forward pass sees it, duck-typed to transformers' `Cache.update` interface.

    `rows` is a slice of cache rows (a view: writes land in the cache) or, for rows that are not adjacent,
    an index tensor (gathered, updated, and scattered back). `write_index[i, q]` is where row i's q-th new
    token is stored; attention then reads positions [0, read_length) of each row, and the caller's 4-D mask
    hides what a row must not see.
    """

    is_compileable = False

    def __init__(
        self, cache: SlotKVCache, rows: slice | torch.Tensor, write_index: torch.Tensor, read_length: int
    ) -> None:
        self.cache = cache
        self.rows = rows
        self.read_length = read_length
        shape = cache.shape
        n, q = write_index.shape
        self._index = write_index.view(n, 1, q, 1).expand(n, shape.num_kv_heads, q, shape.head_dim)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for store, new in (
            (self.cache.keys[layer_idx], key_states),
            (self.cache.values[layer_idx], value_states),
        ):
            if isinstance(self.rows, slice):
                rows = store[self.rows]
                rows.scatter_(2, self._index, new.to(rows.dtype))
            else:
                rows = store.index_select(0, self.rows)
                rows.scatter_(2, self._index, new.to(rows.dtype))
                store.index_copy_(0, self.rows, rows)
            out.append(rows[:, :, : self.read_length])
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.read_length
