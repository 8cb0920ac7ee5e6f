"""The KV pool's memory (engine/kv_cache.py)."""

from __future__ import annotations

import psutil
import torch

from prefixserve.adapters.kv_prefix import KVShape
from prefixserve.engine.kv_cache import KVPool


def test_the_pool_is_resident_from_the_start():
    """The pool is the prompt cache, so it fills up in normal use: its memory is committed when the server
    starts (a container sized by its start-up memory is not killed later), not page by page as blocks are
    first used, which made the soak's resident set grow by 123 MB in 10 minutes."""
    process = psutil.Process()
    before = process.memory_info().rss
    pool = KVPool.sized(KVShape(4, 2, 64, 128), 256, 16, torch.float32, torch.device("cpu"))
    grown = process.memory_info().rss - before
    assert pool.nbytes > 250 * 2**20
    assert grown >= 0.9 * pool.nbytes, (
        f"{grown / 2**20:.0f} MB resident of a {pool.nbytes / 2**20:.0f} MB pool"
    )
    assert all(not t.any() for t in pool.keys[:1] + pool.values[:1])
