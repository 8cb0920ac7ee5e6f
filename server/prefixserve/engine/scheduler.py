"""Iteration-level (continuous) batching over a pool of KV blocks: which tokens run in the next forward pass.

Every step is one flat batch of up to `max_step_tokens` tokens: one for each decoding row, then prompt chunks
of rows still taking their prompts in, then the prompts of waiting requests as they are admitted. A request
is admitted while a row and enough blocks are free (its adapter prefix costs blocks only when no running
row holds it already). When a decoding row needs a block and none is free, the newest row is preempted: it
gives its blocks back and waits at the head of the queue to be recomputed, so the pool, not the request,
decides how much runs at once, and no request fails for lack of memory.

`schedule()` and `postprocess()` are the only places that change a sequence's state; what they change in
the pool is returned as data (`SchedulerOutput.prefix_fills`) for the model runner to carry out.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from prefixserve.adapters.registry import LoadedPrefix
from prefixserve.engine.block_manager import BlockManager, blocks_for
from prefixserve.engine.errors import QueueFullError
from prefixserve.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledRow:
    seq: Sequence
    num_tokens: int  # tokens of seq.token_ids fed this step, from seq.num_computed on
    samples: bool = field(init=False)  # this step takes the row's last token in: its logits pick the next

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "samples", self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)
        )


@dataclass
class SchedulerOutput:
    rows: list[ScheduledRow] = field(default_factory=list)
    prefix_fills: list[tuple[list[int], LoadedPrefix]] = field(default_factory=list)  # slots to write
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def sampling(self) -> list[Sequence]:
        return [r.seq for r in self.rows if r.samples]

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)


@dataclass(frozen=True)
class TokenUpdate:
    seq: Sequence
    token: int
    text_delta: str
    finish_reason: FinishReason | None


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_rows: int,
        max_waiting: int,
        max_step_tokens: int,
        eos_token_ids: Collection[int] = (),
        max_length: int | None = None,
    ) -> None:
        self.blocks = blocks
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.max_step_tokens = max_step_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_length = max_length
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self._lock = threading.Lock()  # `add` runs on request threads, everything else on the engine's

    # ----- queue ----------------------------------------------------------------------------------------
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

    def take_cancelled(self) -> list[Sequence]:
        """Remove cancelled requests, waiting or running, and free their blocks."""
        with self._lock:
            cancelled = [s for s in self.waiting if s.cancelled]
            if cancelled:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for seq in [s for s in self.running if s.cancelled]:
            self._release(seq)
            cancelled.append(seq)
        for seq in cancelled:
            self._mark_finished(seq, FinishReason.CANCELLED)
        return cancelled

    def take_all(self) -> list[Sequence]:
        """Empty the scheduler (after a failed step), freeing every block."""
        with self._lock:
            seqs = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for seq in list(self.running):
            self._release(seq)
            seq.status = SequenceStatus.WAITING
        return seqs

    # ----- the step -------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[int, ScheduledRow] = {}
        budget = self.max_step_tokens
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        for seq in decoding + [s for s in self.running if s.num_uncomputed > 1]:
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            if n == 0:
                continue
            while not self.blocks.grow(seq.blocks, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if (row := scheduled.pop(victim.seq_id, None)) is not None:
                    budget += row.num_tokens
                if victim is seq:
                    break
            else:
                scheduled[seq.seq_id] = ScheduledRow(seq, n)
                budget -= n
        if not out.preempted:  # admitting while rows are being pushed out would only thrash
            self._admit(out, scheduled, budget)
        out.rows = list(scheduled.values())
        return out

    def _admit(self, out: SchedulerOutput, scheduled: dict[int, ScheduledRow], budget: int) -> None:
        while budget > 0 and len(self.running) < self.max_rows:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                n = min(seq.num_uncomputed, budget)
                cost = self.blocks.prefix_cost(seq.prefix_key, seq.num_virtual_tokens)
                if cost + blocks_for(seq.num_computed + n, self.blocks.block_size) > self.blocks.num_free:
                    return
                self.waiting.popleft()
            if seq.prefix is not None:
                fill = self.blocks.acquire_prefix(seq.blocks, seq.prefix_key, seq.num_virtual_tokens)
                assert fill is not None, "checked against num_free above"
                if fill:
                    out.prefix_fills.append((fill, seq.prefix))
            grown = self.blocks.grow(seq.blocks, seq.num_computed + n)
            assert grown, "checked against num_free above"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = ScheduledRow(seq, n)
            budget -= n

    def postprocess(self, out: SchedulerOutput, tokens: list[int]) -> list[TokenUpdate]:
        """Advance every row by what it took in; append the sampled `tokens` (one per `out.sampling` row, in
        order), detokenize, and finish the rows that are done, freeing their blocks."""
        for row in out.rows:
            row.seq.num_computed += row.num_tokens
        updates = []
        for seq, token in zip(out.sampling, tokens, strict=True):
            seq.append_output(token)
            assert seq.text is not None
            delta = seq.text.add(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                delta += seq.text.finish()
                self.finish(seq, reason)
            updates.append(TokenUpdate(seq, token, delta, reason))
        return updates

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        assert seq.text is not None
        if seq.text.stopped:
            return FinishReason.STOP_SEQUENCE
        full = self.max_length is not None and seq.num_virtual_tokens + len(seq.token_ids) >= self.max_length
        if len(seq.output_ids) >= (seq.params.max_new_tokens or 0) or full:
            return FinishReason.LENGTH
        return None

    # ----- state changes --------------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a running row out for good (done, cancelled or failed) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self._release(seq)
        self._mark_finished(seq, reason)

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.blocks)

    def _mark_finished(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        with self._lock:
            self.waiting.appendleft(seq)
