"""The engine: admits requests, runs one step at a time (schedule → run → sample → postprocess) on its own thread.

Callers hand in token ids, an adapter and sampling parameters, plus a sink that receives a `TokenEvent`
per generated token; the sink is called on the engine thread and must only hand the event over.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import replace

import torch

from prefixserve import metrics
from prefixserve.adapters.ids import AdapterRef
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.engine.block_manager import BlockManager, blocks_for
from prefixserve.engine.cpu.kernels import Kernels
from prefixserve.engine.cpu.threads import mark_engine_thread
from prefixserve.engine.detokenizer import OutputText
from prefixserve.engine.errors import EngineStoppedError
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.limits import EngineLimits
from prefixserve.engine.model_loader import LoadedModel
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.prefix_cache import CacheScope, cache_root
from prefixserve.engine.reporter import Reporter
from prefixserve.engine.sampling import make_generator, sample
from prefixserve.engine.scheduler import Scheduler
from prefixserve.engine.sequence import (
    FinishReason,
    OutputSink,
    SamplingParams,
    Sequence,
)
from prefixserve.engine.structured_output import GrammarCompiler
from prefixserve.engine.validation import RequestValidator

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        registry: AdapterRegistry,
        limits: EngineLimits,
        prefix_caching: bool = True,
        cache_scope: CacheScope = CacheScope.TENANT,
        kernels: Kernels | None = None,
    ) -> None:
        self.loaded = loaded
        self.registry = registry
        self.limits = limits
        self.prefix_caching = prefix_caching
        self.cache_scope = cache_scope
        self._cache_resets: list[Future[int]] = []  # asked for from other threads, done on the engine's
        self._looping = False
        self.max_length = loaded.max_length
        self.pool = KVPool.sized(
            loaded.kv_shape, limits.kv_cache_mb, limits.block_size, loaded.dtype, loaded.device
        )
        if self.pool.num_blocks < blocks_for(self.max_length, limits.block_size) + 1:
            log.warning(
                "the KV cache (--kv-cache-mb %g: %d blocks of %d tokens) holds less than one row of "
                "--max-total-tokens %d: longer requests are refused (422); raise --kv-cache-mb to serve them",
                limits.kv_cache_mb,
                self.pool.num_blocks,
                limits.block_size,
                self.max_length,
            )
        self.runner = ModelRunner(loaded.model, self.pool, kernels)
        self._greedy = kernels.greedy_pick if kernels is not None else None
        self.scheduler = Scheduler(
            BlockManager(self.pool.num_blocks, self.pool.block_size),
            limits.max_batch_size,
            limits.max_queue_size,
            limits.max_prefill_tokens,
            loaded.eos_token_ids,
            loaded.max_length,
        )
        self._kv_cache_usage = 0.0  # as of the last step; read by metrics from other threads
        self.reporter = Reporter(loaded.tokenizer)
        self._vocab_size = loaded.model.get_input_embeddings().num_embeddings
        self.grammars = GrammarCompiler(loaded.tokenizer, self._vocab_size, list(loaded.eos_token_ids))
        self.validator = RequestValidator(
            limits, self.max_length, self._vocab_size, self.pool.block_size, self.pool.num_blocks
        )
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----- requests -----------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        adapter: AdapterRef | None,
        params: SamplingParams,
        sink: OutputSink,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> Sequence:
        """Validate and queue a request of `tenant` (default: the adapter's namespace; the server derives it
        from the API key). `cache_salt` narrows whose cached prompt blocks the request may share. Raises
        RequestValidationError, AdapterError or QueueFullError."""
        if self._stopping:
            raise EngineStoppedError("the server is shutting down; retry on another replica")
        load_start = time.monotonic()
        prefix = self.registry.get(*adapter) if adapter is not None else None
        load_end = time.monotonic()
        num_virtual = prefix.num_virtual_tokens if prefix is not None else 0
        params = self.validator.check(prompt_ids, num_virtual, params, cache_salt)
        if params.do_sample and params.seed is None:
            params = replace(params, seed=secrets.randbits(63))
        if tenant is None:
            tenant = adapter[0] if adapter is not None else ""
        constraint = None
        if params.grammar is not None:  # compiled here, on the caller's thread, not in the step loop
            constraint = self.grammars.constraint(params.grammar.kind, params.grammar.value)
        seq = Sequence(prompt_ids=list(prompt_ids), params=params, prefix=prefix, sink=sink, tenant=tenant)
        seq.constraint = constraint
        if self.prefix_caching:
            seq.cache_root = cache_root(seq.prefix_key, tenant, cache_salt, self.cache_scope)
        if prefix is not None:
            seq.adapter_load_start, seq.adapter_load_end = load_start, load_end
        seq.text = OutputText(
            self.loaded.tokenizer, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
        )
        if params.do_sample:
            seq.generator = make_generator(params.seed, self.loaded.device)
        with self._wakeup:  # the loop checks `_stopping` under this lock too: no request slips past its exit
            if self._stopping:
                raise EngineStoppedError("the server is shutting down; retry on another replica")
            self.scheduler.add(seq)
            metrics.QUEUE_SIZE.set(len(self.scheduler.waiting))
            self._wakeup.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Free the request's row at the next step (a client went away)."""
        seq.cancelled = True
        with self._wakeup:
            self._wakeup.notify()

    # ----- the step -----------------------------------------------------------------------------------
    @torch.inference_mode()  # the pool is written inside forward passes; every write must be in this mode
    def step(self) -> None:
        self._reset_cache_if_asked()
        for seq in self.scheduler.take_cancelled():
            self.reporter.finish(seq)
        out = self.scheduler.schedule()
        if out.cache_queries:
            for counter, value in (
                (metrics.VLLM_PREFIX_CACHE_QUERIES, out.cache_queries),
                (metrics.PREFIX_CACHE_QUERIES, out.cache_queries),
                (metrics.VLLM_PREFIX_CACHE_HITS, out.cache_hits),
                (metrics.PREFIX_CACHE_HITS, out.cache_hits),
            ):
                counter.inc(value)
        metrics.QUEUE_SIZE.set(len(self.scheduler.waiting))
        self._update_pool_gauges()
        if out.preempted:
            metrics.PREEMPTIONS.inc(len(out.preempted))
        if not out.rows:
            return
        now = time.monotonic()
        for row in out.rows:
            if row.seq.admitted_time is None:
                row.seq.admitted_time = now
                metrics.REQUEST_QUEUE_DURATION.observe(now - row.seq.arrival_time)
        try:
            logits = self.runner.run(out)
            sampled = sample(logits.sampling, out.sampling, self.scheduler.eos_token_ids, self._greedy)
            prompt_scores = self.reporter.prompt_scores(logits)
        except Exception as exc:  # keep serving the others; these rows fail with a message
            log.exception("forward pass failed for %d rows", len(out.rows))
            for row in out.rows:
                self.scheduler.finish(row.seq, FinishReason.ERROR)
                self.reporter.finish(row.seq, error=f"generation failed: {type(exc).__name__}")
            self._update_pool_gauges()
            return
        metrics.PROMPT_TOKENS.inc(sum(r.num_tokens for r in out.rows if not r.seq.prefill_done))
        for i, why in sampled.errors.items():
            log.warning("request %d failed alone in its step: %s", out.sampling[i].seq_id, why)
        top_by_seq = {
            s.seq_id: (lp, top)
            for s, lp, top in zip(out.sampling, sampled.logprobs, sampled.top, strict=True)
        }
        for update in self.scheduler.postprocess(out, sampled.tokens, prompt_scores, sampled.errors):
            logprob, top = top_by_seq[update.seq.seq_id]
            self.reporter.token(update, logprob, top)
        self._update_pool_gauges()  # rows that just finished are gone, with their blocks

    def _update_pool_gauges(self) -> None:
        blocks = self.scheduler.blocks
        self._kv_cache_usage = blocks.num_used / blocks.num_blocks
        metrics.KV_CACHE_USAGE.set(self._kv_cache_usage)
        metrics.BATCH_SIZE.set(len(self.scheduler.running))
        metrics.PREFIX_CACHE_BLOCKS.set(blocks.num_cached)

    # ----- the prompt cache ---------------------------------------------------------------------------
    def reset_prefix_cache(self) -> Future[int]:
        """Forget every cached prompt block (vLLM's /reset_prefix_cache); the future gives how many were
        cached. Done on the engine thread, between steps: the block manager is that thread's alone."""
        future: Future[int] = Future()
        with self._wakeup:
            if not self._looping:  # driven step by step (tests, benchmarks): no other thread to wait for
                future.set_result(self.scheduler.blocks.reset_cache())
                return future
            self._cache_resets.append(future)
            self._wakeup.notify()
        return future

    def _reset_cache_if_asked(self) -> None:
        with self._wakeup:
            resets, self._cache_resets = self._cache_resets, []
        if resets:
            count = self.scheduler.blocks.reset_cache()
            self._update_pool_gauges()
            for future in resets:
                future.set_result(count)

    # ----- the loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the step loop on a thread of its own (tests, benchmarks, embedding the engine)."""
        self._thread = threading.Thread(target=self.run_loop, name="prefixserve-engine", daemon=True)
        self._thread.start()

    def run_loop(self) -> None:
        """Step until `stop_accepting()` was called and no work is left. The server calls this on the main
        thread: oneDNN's kernels measured ~70% slower called from any other thread (bench/RESULTS.md)."""
        mark_engine_thread()
        with self._wakeup:
            self._looping = True
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self.scheduler.has_work() and not self._stopping and not self._cache_resets:
                        self._wakeup.wait()
                    if self._stopping and not self.scheduler.has_work():
                        self._looping = False
                        for future in self._cache_resets:  # nobody left to do it: do it here
                            future.set_result(self.scheduler.blocks.reset_cache())
                        self._cache_resets = []
                        return
                try:
                    self.step()
                except Exception:  # a bug must not leave every client waiting on a dead loop
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all("internal engine error")

    def _fail_all(self, error: str) -> None:
        with self._wakeup:
            seqs = self.scheduler.take_all()
        for seq in seqs:
            self.scheduler.finish(seq, FinishReason.ERROR)
            self.reporter.finish(seq, error=error)

    def stop_accepting(self) -> None:
        self._stopping = True
        with self._wakeup:
            self._wakeup.notify()

    def cancel_all(self) -> None:
        for seq in self.scheduler.waiting_list() + list(self.scheduler.running):
            self.cancel(seq)

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def running_adapters(self) -> list[tuple[str, str]]:
        """(tenant, adapter name) of each running row that has a prefix; may be called from any thread."""
        return _adapter_refs(list(self.scheduler.running))

    def waiting_adapters(self) -> list[tuple[str, str]]:
        return _adapter_refs(self.scheduler.waiting_list())

    def kv_cache_usage(self) -> float:
        """As of the last step: the block manager itself is the engine thread's alone (counting its free
        blocks while the engine takes some raised from a scrape, and /metrics answered 500)."""
        return self._kv_cache_usage

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)


def _adapter_refs(seqs: list[Sequence]) -> list[tuple[str, str]]:
    refs = []
    for seq in seqs:
        prefix = seq.prefix  # read once: the engine thread clears it when the sequence finishes
        if prefix is not None:
            refs.append((prefix.namespace, prefix.name))
    return refs
