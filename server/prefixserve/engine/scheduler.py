"""Iteration-level (continuous) batching: which rows run in the next forward pass.

Waiting requests join as soon as a row is free; their prompts go in by prefill steps (long ones a chunk at a
time, alternating with decode steps), and finished rows leave at once. Running rows stay compact,
`running[i]` being the sequence in cache row i, so a leaving row is filled by moving the last row into its
place.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from prefixserve.engine.errors import QueueFullError
from prefixserve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Step:
    seqs: list[Sequence]
    chunk_lens: list[int] | None  # a prefill step: prompt tokens each row takes in; None: a decode step

    @property
    def is_prefill(self) -> bool:
        return self.chunk_lens is not None


class Scheduler:
    def __init__(self, max_rows: int, max_waiting: int, max_prefill_tokens: int) -> None:
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()
        self._last_was_prefill = False

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

    def schedule(self) -> Step:
        """The next step: a prefill chunk for the rows still taking in their prompts, or a decode of all rows.

        Waiting requests join as soon as rows are free. When some rows decode while others take in a long
        prompt, prefill and decode steps alternate, so a long prompt delays running rows by one chunk at a
        time, not by its whole length."""
        with self._lock:
            while self.waiting and len(self.running) < self.max_rows:
                seq = self.waiting.popleft()
                seq.slot = len(self.running)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
        pending = [s for s in self.running if not s.prefill_done]
        decoding = len(pending) < len(self.running)
        if pending and not (decoding and self._last_was_prefill):
            self._last_was_prefill = True
            pending.sort(key=lambda s: s.arrival_time)
            pending = pending[: self.max_prefill_tokens]  # at least one token per row
            width = max(1, self.max_prefill_tokens // len(pending))  # the padded batch: rows x widest chunk
            return Step(pending, [min(width, s.num_prompt_tokens - s.num_prefilled) for s in pending])
        self._last_was_prefill = False
        return Step(list(self.running), None)

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
