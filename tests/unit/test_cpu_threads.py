"""Torch work on helper threads runs single-threaded (engine/cpu/threads.py), and the engine's thread keeps its
count: libgomp would otherwise give each helper a team of its own and cut every worker's spin-wait."""

from __future__ import annotations

import threading

import pytest
import torch

from prefixserve.engine.cpu import threads


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="this torch does not use libgomp")
def test_a_helper_thread_is_confined_and_the_engine_thread_is_not(monkeypatch):
    monkeypatch.setattr(threads, "_engine_thread", None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_confinement()
    finally:
        torch.set_num_threads(before)


def _check_confinement() -> None:
    seen: dict[str, int] = {}
    marked, helped = threading.Event(), threading.Event()

    def engine() -> None:  # alive while the helper runs: a finished thread's id can be given to the next one
        threads.mark_engine_thread()
        marked.set()
        helped.wait(10)
        threads.confine_to_one_thread()  # a no-op here
        seen["engine"] = torch.get_num_threads()

    def helper() -> None:
        marked.wait(10)
        seen["helper"] = threads.single_threaded(torch.get_num_threads)()
        helped.set()

    running = [threading.Thread(target=target) for target in (engine, helper)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    assert seen == {"engine": 2, "helper": 1}
    assert torch.get_num_threads() == 2  # the caller's own count is untouched
