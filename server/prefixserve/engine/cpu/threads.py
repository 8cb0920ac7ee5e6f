"""Torch work off the engine thread runs on one CPU thread, so that the engine's OpenMP workers keep spinning.

libgomp gives every thread that starts a parallel region its own team of workers, and once it manages more
threads than there are CPUs it cuts every worker's spin-wait to 1,000 iterations: the engine's worker then
sleeps between the ~1,000 small ops of a decode step and pays a futex wake-up for each. The server's helper
threads (adapter uploads and loads, request submission) each ran a few torch ops with two threads; on 2
cores the engine's OpenMP worker then idled 30% of a decode step, and a 64-row Qwen2.5-0.5B-shaped step took
131-144 ms in the server against 98-104 ms in-process (bench/RESULTS.md). One thread for that work costs
nothing measurable (it is a few small tensors per request), and the engine keeps the only team.

`torch.set_num_threads(1)` is not usable here: it also sets MKL's process-wide thread count. OpenMP's
`omp_set_num_threads` sets the calling thread's own count only.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

_confined = threading.local()
_engine_thread: int | None = None


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """libgomp's omp_set_num_threads, from the copy torch loaded (None where torch uses no libgomp)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = set(re.findall(r"(/\S*libgomp[^/\s]*\.so[^/\s]*)", maps.read()))
        if not paths:
            return None
        setter = ctypes.CDLL(sorted(paths)[0]).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    setter.argtypes = [ctypes.c_int]
    return setter


def mark_engine_thread() -> None:
    """The calling thread runs the engine's steps: it keeps torch's thread count."""
    global _engine_thread
    _engine_thread = threading.get_ident()


def confine_to_one_thread() -> None:
    """Make the calling thread's own torch ops single-threaded (once per thread; not the engine's thread)."""
    if getattr(_confined, "done", False) or threading.get_ident() == _engine_thread:
        return
    _confined.done = True
    setter = _omp_set_num_threads()
    if setter is None:
        return
    torch.get_num_threads()  # torch sets a thread's OpenMP count once, lazily: let it do so first
    setter(1)


def single_threaded(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run with `confine_to_one_thread()` first: for work handed to a helper thread."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        confine_to_one_thread()
        return fn(*args, **kwargs)

    return wrapper
