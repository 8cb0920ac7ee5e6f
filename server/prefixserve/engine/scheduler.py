"""Iteration-level (continuous) batching: which rows run in the next forward pass.

Waiting requests join as soon as a row is free (a prefill step); finished rows leave at once. Running
rows stay compact, `running[i]` being the sequence in cache row i, so a leaving row is filled by
moving the last row into its place.
"""

from __future__ import annotations

import threading
from collections import deque

from prefixserve.engine.errors import QueueFullError
from prefixserve.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_rows: int, max_waiting: int, max_prefill_tokens: int) -> None:
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            free_rows = max(0, self.max_rows - len(self.running))
            if len(self.waiting) >= self.max_waiting + free_rows:
                raise QueueFullError(
                    f"the server is at capacity ({len(self.running)} running, {len(self.waiting)} waiting); "
                    "retry later"
                )
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_cancelled_waiting(self) -> list[Sequence]:
        with self._lock:
            cancelled = [s for s in self.waiting if s.cancelled]
            if cancelled:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
        return cancelled

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The rows of the next step and whether it is a prefill (new rows) or a decode (all running rows)."""
        joining: list[Sequence] = []
        width = 0  # the padded batch costs rows x the widest row, not the sum of the rows
        with self._lock:
            while self.waiting and len(self.running) + len(joining) < self.max_rows:
                seq = self.waiting[0]
                new_width = max(width, seq.num_virtual_tokens + seq.num_prompt_tokens)
                if joining and new_width * (len(joining) + 1) > self.max_prefill_tokens:
                    break
                self.waiting.popleft()
                width = new_width
                joining.append(seq)
        if joining:
            for seq in joining:
                seq.slot = len(self.running)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            return joining, True
        return list(self.running), False

    def take_all(self) -> list[Sequence]:
        """Empty the scheduler (after a failed step; the cache rows are simply reused)."""
        with self._lock:
            seqs = list(self.running) + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
        for seq in seqs:
            seq.slot = -1
        return seqs

    def remove(self, seq: Sequence) -> tuple[Sequence, int, int] | None:
        """Take `seq` out of the batch. If another row must move into its slot, return (moved, src, dst)."""
        slot = seq.slot
        assert self.running[slot] is seq, "running rows out of sync with cache rows"
        last = self.running.pop()
        seq.slot = -1
        if last is seq:
            return None
        self.running[slot] = last
        src, last.slot = last.slot, slot
        return last, src, slot
