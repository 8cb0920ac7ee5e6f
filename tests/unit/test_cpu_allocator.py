"""glibc keeps a step's large freed blocks (engine/cpu/allocator.py) instead of unmapping them, so the next step
does not page-fault them in again."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from prefixserve.engine.cpu import allocator


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


def _mallinfo() -> MallInfo2:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def test_a_16_mb_tensor_comes_from_the_heap_and_stays_there_when_freed():
    assert allocator.keep_freed_memory()  # CI and the image run glibc: the setting must take
    mmapped = _mallinfo().hblkhd
    block = torch.empty(4 * 1024 * 1024, dtype=torch.float32)  # 16 MB: mmapped under glibc's defaults
    block.fill_(1.0)
    assert _mallinfo().hblkhd - mmapped < 1024 * 1024, "a 16 MB block was mmapped despite the threshold"
    del block
    assert _mallinfo().fordblks >= 16 * 1024 * 1024, "the freed block left the heap (trimmed)"
    assert allocator.keep_freed_memory()  # once per process: a second call changes nothing
