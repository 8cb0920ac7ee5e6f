"""Iteration-level (continuous) batching over a pool of KV blocks: which tokens run in the next forward pass.

Every step is one flat batch of up to `max_step_tokens` tokens: one for each decoding row, then prompt chunks
of rows still taking their prompts in, then the prompts of waiting requests as they are admitted. A request
is admitted while a row and enough blocks are free (its adapter prefix costs blocks only when no running
row holds it already). When a decoding row needs a block and none is free, the newest row is preempted: it
gives its blocks back and waits at the head of the queue to be recomputed, so the pool, not the request,
decides how much runs at once, and no request fails for lack of memory.

Tenants are served fairly: waiting requests are admitted round-robin across tenants (`FairQueue`), and a
tenant with no running row whose request cannot get a row or blocks takes them from the tenant holding the
most rows (its newest is preempted, while it keeps at least one), so one tenant's long requests cannot hold
every row while another tenant waits.

`schedule()` and `postprocess()` are the only places that change a sequence's state; what they change in
the pool is returned as data (`SchedulerOutput.prefix_fills`) for the model runner to carry out.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from prefixserve.adapters.kv_prefix import LoadedPrefix
from prefixserve.engine.block_manager import BlockManager, blocks_for
from prefixserve.engine.errors import QueueFullError
from prefixserve.engine.fair_queue import FairQueue
from prefixserve.engine.prefix_cache import extend_chain
from prefixserve.engine.sequence import FinishReason, PromptToken, Sequence, SequenceStatus


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
    prefix_fills: list[tuple[list[int], LoadedPrefix]] = field(default_factory=list)  # blocks to write
    preempted: list[Sequence] = field(default_factory=list)
    cache_queries: int = 0  # prompt tokens of admitted rows that looked in the prompt cache ...
    cache_hits: int = 0  # ... and how many of them it held

    @property
    def sampling(self) -> list[Sequence]:
        return [r.seq for r in self.rows if r.samples]

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)


@dataclass(frozen=True)
class TokenUpdate:
    seq: Sequence
    token: int  # -1: the row finished without a new token (max_new_tokens=0, or it failed)
    text_delta: str
    finish_reason: FinishReason | None
    prompt: tuple[PromptToken, ...] | None = None  # the prompt's log-probabilities, with the first update
    error: str | None = None


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
        self.waiting = FairQueue()
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

    def waiting_list(self) -> list[Sequence]:
        """A copy of the waiting requests, safe to take from another thread."""
        with self._lock:
            return list(self.waiting)

    def take_cancelled(self) -> list[Sequence]:
        """Remove cancelled requests, waiting or running, and free their blocks."""
        with self._lock:
            cancelled = self.waiting.remove_if(lambda s: s.cancelled)
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
                victim = self._newest_of_richest()
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
            pending: set[bytes] = set()
            for row in scheduled.values():
                self._add_pending(pending, row)
            self._admit(out, scheduled, budget, pending)
        out.rows = list(scheduled.values())
        return out

    def _add_pending(self, pending: set[bytes], row: ScheduledRow) -> None:
        """The keys of the full blocks `row` computes in this step: cached once the step is done."""
        seq, size = row.seq, self.blocks.block_size
        if seq.cache_root is not None:
            extend_chain(seq.block_hashes, seq.cache_root, seq.token_ids, size)
            pending.update(
                seq.block_hashes[seq.num_computed // size : (seq.num_computed + row.num_tokens) // size]
            )

    def _waits_for_pending(self, seq: Sequence, cached: list[int], pending: set[bytes]) -> bool:
        """Whether the block after `seq`'s cached ones is being computed in this step by another row: one step
        later it is cached, and `seq` skips it instead of computing the same tokens beside it."""
        if seq.cache_root is None or seq.num_computed or seq.wants_prompt_logprobs:
            return False
        usable = (len(seq.token_ids) - 1) // self.blocks.block_size
        return len(cached) < usable and seq.block_hashes[len(cached)] in pending

    def _admit(
        self, out: SchedulerOutput, scheduled: dict[int, ScheduledRow], budget: int, pending: set[bytes]
    ) -> None:
        while budget > 0:
            with self._lock:
                seq = self.waiting.peek()
                if seq is None:
                    return
                cached = self._cached_blocks(seq)
                if self._waits_for_pending(seq, cached, pending):
                    return
                n = min(seq.num_uncomputed - len(cached) * self.blocks.block_size, budget)
                victims = []
                if not self._fits(seq, n, cached):
                    seq = self._starving()
                    if seq is None:
                        return
                    cached = self._cached_blocks(seq)
                    uncomputed = seq.num_uncomputed - len(cached) * self.blocks.block_size
                    n = min(uncomputed, budget)
                    while not self._fits(seq, n, cached) and (victim := self._fair_share_victim(seq.tenant)):
                        self._release(victim)
                        victims.append(victim)
                        if (row := scheduled.pop(victim.seq_id, None)) is not None:
                            budget += row.num_tokens
                        cached = self._cached_blocks(seq)  # the victim's blocks may be among them now
                        uncomputed = seq.num_uncomputed - len(cached) * self.blocks.block_size
                        n = min(uncomputed, budget)
                fits = self._fits(seq, n, cached)
                if fits:
                    self.waiting.pop(seq)
                for victim in reversed(victims):  # queued after `seq` left: they go first next time
                    self._requeue(victim)
                    out.preempted.append(victim)
            if not fits:
                return
            if seq.prefix is not None:
                fill = self.blocks.acquire_prefix(seq.blocks, seq.prefix_key, seq.num_virtual_tokens)
                assert fill is not None, "checked against num_free above"
                if fill:
                    out.prefix_fills.append((fill, seq.prefix))
            if seq.cache_root is not None and seq.num_computed == 0:
                self.blocks.take_cached(seq.blocks, cached)
                seq.num_computed = len(cached) * self.blocks.block_size
                out.cache_queries += len(seq.token_ids)
                out.cache_hits += seq.num_computed
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = min(seq.num_computed, len(seq.prompt_ids))
            grown = self.blocks.grow(seq.blocks, seq.num_computed + n)
            assert grown, "checked against num_free above"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = row = ScheduledRow(seq, n)
            self._add_pending(pending, row)
            budget -= n

    def _fits(self, seq: Sequence, n: int, cached: list[int]) -> bool:
        """Whether `seq` can start now with its first `n` uncached tokens: a free row, and blocks for them (and
        for its prefix, unless a running row holds it already; cached blocks no row holds count as free)."""
        cost = self.blocks.prefix_cost(seq.prefix_key, seq.num_virtual_tokens) + self.blocks.match_cost(
            cached
        )
        computed = seq.num_computed + len(cached) * self.blocks.block_size
        blocks = cost + blocks_for(computed + n, self.blocks.block_size) - len(cached)
        return len(self.running) < self.max_rows and blocks <= self.blocks.num_free

    def _cached_blocks(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting row can start from: its leading full blocks, all but its last token (whose
        logits it needs). None for rows that score their prompt: they need the logits of every token."""
        if seq.cache_root is None or seq.num_computed or seq.wants_prompt_logprobs:
            return []
        extend_chain(seq.block_hashes, seq.cache_root, seq.token_ids, self.blocks.block_size)
        usable = (len(seq.token_ids) - 1) // self.blocks.block_size
        return self.blocks.match(seq.block_hashes[:usable])

    def _starving(self) -> Sequence | None:
        """The next request of the first tenant in turn that has no running row, if any."""
        running = {s.tenant for s in self.running}
        return next((seq for seq in self.waiting.heads() if seq.tenant not in running), None)

    def _fair_share_victim(self, tenant: str) -> Sequence | None:
        """The row to push out so that `tenant`, which has none running, gets one: the newest row of a tenant
        with the most rows, as long as that tenant keeps one. None when no tenant has two."""
        rows = Counter(s.tenant for s in self.running)
        if rows[tenant] or not rows or max(rows.values()) < 2:
            return None
        return self._newest_of_richest()

    def _newest_of_richest(self) -> Sequence:
        """The newest running row among the tenants holding the most rows (with one tenant: the newest)."""
        rows = Counter(s.tenant for s in self.running)
        most = max(rows.values())
        return next(s for s in reversed(self.running) if rows[s.tenant] == most)

    def postprocess(
        self,
        out: SchedulerOutput,
        tokens: list[int],
        prompt_scores: dict[int, tuple[int, list[PromptToken]]] | None = None,
        failed: Mapping[int, str] | None = None,
    ) -> list[TokenUpdate]:
        """Advance every row by what it took in; append the sampled `tokens` (one per `out.sampling` row, in
        order), detokenize, and finish the rows that are done, freeing their blocks. `prompt_scores` maps a
        row's id to (index of its first scored prompt token, entries); a recomputed row keeps what it had.
        Rows in `failed` (index into `out.sampling` → why) finish with an error instead."""
        for seq_id, (first, entries) in (prompt_scores or {}).items():
            seq = next(r.seq for r in out.rows if r.seq.seq_id == seq_id)
            seq.prompt_logprobs += entries[len(seq.prompt_logprobs) - first :]
        for row in out.rows:
            row.seq.num_computed += row.num_tokens
            self._offer_to_cache(row.seq)
        updates = []
        for i, (seq, token) in enumerate(zip(out.sampling, tokens, strict=True)):
            if failed and i in failed:
                self.finish(seq, FinishReason.ERROR)
                updates.append(TokenUpdate(seq, -1, "", FinishReason.ERROR, error=failed[i]))
                continue
            prompt = None
            if seq.params.prompt_logprobs is not None and not seq.prompt_reported:
                seq.prompt_reported = True
                prompt = tuple(seq.prompt_logprobs)
            if seq.params.max_new_tokens == 0:  # scored its prompt: nothing to generate
                self.finish(seq, FinishReason.LENGTH)
                updates.append(TokenUpdate(seq, -1, "", FinishReason.LENGTH, prompt))
                continue
            updates.append(self._append(seq, token, prompt))
        return updates

    def _append(self, seq: Sequence, token: int, prompt: tuple[PromptToken, ...] | None) -> TokenUpdate:
        seq.append_output(token)
        assert seq.text is not None
        delta = seq.text.add(token, match_stops=len(seq.output_ids) >= seq.params.min_new_tokens)
        reason = self._finish_reason(seq, token)
        if seq.constraint is not None and reason is None:
            try:
                seq.constraint.accept(token)
            except RuntimeError as exc:
                self.finish(seq, FinishReason.ERROR)
                return TokenUpdate(seq, token, delta, FinishReason.ERROR, prompt, error=str(exc))
            if seq.constraint.done:  # the structured output is complete
                reason = FinishReason.EOS
        if reason is not None:
            delta += seq.text.finish()
            self.finish(seq, reason)
        return TokenUpdate(seq, token, delta, reason, prompt)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if len(seq.output_ids) >= p.min_new_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return FinishReason.EOS
            assert seq.text is not None
            if seq.text.stopped or token in p.stop_token_ids:
                return FinishReason.STOP_SEQUENCE
        full = self.max_length is not None and seq.num_virtual_tokens + len(seq.token_ids) >= self.max_length
        if len(seq.output_ids) >= (seq.params.max_new_tokens or 0) or full:
            return FinishReason.LENGTH
        return None

    def _offer_to_cache(self, seq: Sequence) -> None:
        """Register the row's newly completed full blocks, so that the next request with these tokens skips them."""
        if seq.cache_root is None:
            return
        full = seq.num_computed // self.blocks.block_size
        if full > seq.blocks.num_hashed:
            extend_chain(seq.block_hashes, seq.cache_root, seq.token_ids, self.blocks.block_size)
            self.blocks.offer(seq.blocks, seq.block_hashes[:full])

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
        seq.finish_time = time.monotonic()  # before the finishing event is sent: whoever sees it, sees this

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        with self._lock:
            self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """A row whose blocks were released waits at the head of the queue, to be recomputed from 0."""
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.push_front(seq)
