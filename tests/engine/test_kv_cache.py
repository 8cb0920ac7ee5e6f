"""The KV pool's memory (engine/kv_cache.py)."""

from __future__ import annotations

import os
import struct

import torch

from prefixserve.adapters.kv_prefix import KVShape
from prefixserve.engine.kv_cache import KVPool


def resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor`'s data in pages that are present in memory (bit 63 of /proc/self/pagemap), so that
    whatever else the test process allocated or freed before does not blur the figure."""
    page = os.sysconf("SC_PAGE_SIZE")
    first = tensor.data_ptr() // page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", pagemap.read((last - first + 1) * 8))
    return sum(1 for e in entries if e >> 63) * page


def test_the_pool_is_resident_from_the_start():
    """The pool is the prompt cache, so it fills up in normal use: its memory is committed when the server
    starts (a container sized by its start-up memory is not killed later), not page by page as blocks are
    first used, which made the soak's resident set grow by 123 MB in 10 minutes."""
    pool = KVPool.sized(KVShape(1, 2, 64, 128), 256, 16, torch.float32, torch.device("cpu"))
    for tensor in pool.keys + pool.values:
        assert resident_bytes(tensor) >= 0.99 * tensor.numel() * tensor.element_size()
        assert not tensor.any()
    assert resident_bytes(torch.empty(2**25)) < 2**20  # what the check sees of memory never written
