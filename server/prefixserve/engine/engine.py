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
from dataclasses import dataclass, replace

import torch

from prefixserve import metrics
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.engine.block_manager import BlockManager, blocks_for
from prefixserve.engine.detokenizer import OutputText
from prefixserve.engine.errors import EngineStoppedError, RequestValidationError
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.model_loader import LoadedModel
from prefixserve.engine.model_runner import ModelRunner, StepLogits
from prefixserve.engine.prefix_cache import MAX_CACHE_SALT_CHARS, CacheScope, cache_root
from prefixserve.engine.sampling import TopLogprobs, make_generator, prompt_logprobs, sample
from prefixserve.engine.scheduler import Scheduler, TokenUpdate
from prefixserve.engine.sequence import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOTAL_CHARS,
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_RANGE,
    FinishReason,
    OutputSink,
    PromptToken,
    SamplingParams,
    Sequence,
    TokenEvent,
    TokenLogprob,
)
from prefixserve.engine.structured_output import GrammarCompiler

log = logging.getLogger(__name__)

AdapterRef = tuple[str, tuple[str, ...]]  # (namespace, adapter ids to concatenate)


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 128
    max_queue_size: int = 256
    max_input_tokens: int = 1024
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_prefill_tokens: int = 4096  # tokens of one step: decoding rows, prompt chunks, joining prompts
    kv_cache_mb: float = 1024.0
    block_size: int = 16


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        registry: AdapterRegistry,
        limits: EngineLimits,
        prefix_caching: bool = True,
        cache_scope: CacheScope = CacheScope.TENANT,
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
        self.runner = ModelRunner(loaded.model, self.pool)
        self.scheduler = Scheduler(
            BlockManager(self.pool.num_blocks, self.pool.block_size),
            limits.max_batch_size,
            limits.max_queue_size,
            limits.max_prefill_tokens,
            loaded.eos_token_ids,
            loaded.max_length,
        )
        self._kv_cache_usage = 0.0  # as of the last step; read by metrics from other threads
        self._special_ids = frozenset(loaded.tokenizer.all_special_ids)
        self._vocab_size = loaded.model.get_input_embeddings().num_embeddings
        self.grammars = GrammarCompiler(loaded.tokenizer, self._vocab_size, list(loaded.eos_token_ids))
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
        if params.max_new_tokens is None:
            room = self.max_length - num_virtual - len(prompt_ids)
            params = replace(params, max_new_tokens=max(1, min(self.limits.default_max_new_tokens, room)))
        self._validate(prompt_ids, num_virtual, params)
        if cache_salt is not None and not (
            isinstance(cache_salt, str) and 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS
        ):
            raise RequestValidationError(
                f"cache_salt must be a string of 1 to {MAX_CACHE_SALT_CHARS} characters (it narrows which "
                "requests may share cached prompt blocks), or left out"
            )
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

    def _context_left(self, num_virtual: int) -> str:
        """What a client that sizes its requests (an evaluation harness's max_length) needs to know."""
        left = self.max_length - num_virtual
        source = (
            f"max_total_tokens {self.max_length} - {num_virtual} virtual tokens"
            if num_virtual
            else "max_total_tokens"
        )
        prompt = min(self.limits.max_input_tokens, left - 1)
        subject = "this adapter" if num_virtual else "the base model"
        return (
            f"{subject} leaves {left} tokens for prompt and new tokens together ({source}): "
            f"at most {prompt} prompt tokens with one new token"
        )

    def _validate(self, prompt_ids: list[int], num_virtual: int, p: SamplingParams) -> None:
        lim = self.limits
        if not prompt_ids:
            raise RequestValidationError("inputs must not be empty: give at least one token of prompt")
        if any(not 0 <= t < self._vocab_size for t in prompt_ids):
            raise RequestValidationError(
                f"prompt token ids must be in [0, {self._vocab_size}), the model's vocabulary"
            )
        context = self._context_left(num_virtual)
        if len(prompt_ids) > lim.max_input_tokens:
            raise RequestValidationError(
                f"inputs has {len(prompt_ids)} tokens, above this server's max_input_tokens of "
                f"{lim.max_input_tokens}; {context}"
            )
        if not 1 <= p.max_new_tokens <= lim.max_new_tokens and not (
            p.max_new_tokens == 0 and p.prompt_logprobs is not None
        ):
            raise RequestValidationError(
                f"max_new_tokens must be between 1 and {lim.max_new_tokens}, got {p.max_new_tokens} "
                "(0 only when scoring the prompt)"
            )
        if not 0 <= p.min_new_tokens <= p.max_new_tokens:
            raise RequestValidationError(
                f"min_new_tokens must be between 0 and max_new_tokens ({p.max_new_tokens}), got {p.min_new_tokens}"
            )
        for name, count in (("logprobs", p.logprobs), ("prompt_logprobs", p.prompt_logprobs or 0)):
            if not 0 <= count <= MAX_LOGPROBS:
                raise RequestValidationError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {count}")
        bad = [t for t, _ in p.logit_bias if not 0 <= t < self._vocab_size] + [
            t for t in p.stop_token_ids if not 0 <= t < self._vocab_size
        ]
        if bad:
            raise RequestValidationError(
                f"token id {bad[0]} (in logit_bias or stop_token_ids) is outside the vocabulary [0, {self._vocab_size})"
            )
        total = num_virtual + len(prompt_ids) + p.max_new_tokens
        if total > self.max_length:
            raise RequestValidationError(
                f"adapter virtual tokens ({num_virtual}) + inputs tokens ({len(prompt_ids)}) + max_new_tokens "
                f"({p.max_new_tokens}) = {total}, above max_total_tokens {self.max_length}: "
                f"shorten the prompt or lower max_new_tokens; {context}"
            )
        blocks = blocks_for(num_virtual, self.pool.block_size) + blocks_for(
            len(prompt_ids) + p.max_new_tokens, self.pool.block_size
        )
        if blocks > self.pool.num_blocks:
            raise RequestValidationError(
                f"this request needs {blocks} KV blocks ({num_virtual} virtual + {len(prompt_ids)} prompt + "
                f"{p.max_new_tokens} new tokens), more than the whole KV cache holds ({self.pool.num_blocks}); "
                "shorten it, or start the server with a larger --kv-cache-mb"
            )
        low, high = TEMPERATURE_RANGE
        if p.do_sample and not low <= p.temperature <= high:
            raise RequestValidationError(
                f"temperature must be between {low} and {high} when sampling, got {p.temperature} "
                "(for greedy decoding turn sampling off)"
            )
        if p.top_k is not None and p.top_k < 1:
            raise RequestValidationError(f"top_k must be >= 1, got {p.top_k}")
        if p.top_p is not None and not 0 < p.top_p <= 1:
            raise RequestValidationError(f"top_p must be in (0, 1], got {p.top_p}")
        low, high = REPETITION_PENALTY_RANGE
        if p.repetition_penalty is not None and not low <= p.repetition_penalty <= high:
            raise RequestValidationError(
                f"repetition_penalty must be between {low} and {high}, got {p.repetition_penalty}"
            )
        if len(p.stop) > MAX_STOP_SEQUENCES:
            raise RequestValidationError(
                f"stop holds {len(p.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed "
                f"({MAX_STOP_TOTAL_CHARS} characters in all)"
            )
        if any(not s for s in p.stop):
            raise RequestValidationError("stop sequences must not be empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in p.stop):
            raise RequestValidationError(f"stop sequences may have at most {MAX_STOP_CHARS} characters each")
        if (total := sum(map(len, p.stop))) > MAX_STOP_TOTAL_CHARS:
            raise RequestValidationError(
                f"stop sequences hold {total} characters in all; at most {MAX_STOP_TOTAL_CHARS} are allowed"
            )

    # ----- the step -----------------------------------------------------------------------------------
    @torch.inference_mode()  # the pool is written inside forward passes; every write must be in this mode
    def step(self) -> None:
        self._reset_cache_if_asked()
        for seq in self.scheduler.take_cancelled():
            self._report_finish(seq)
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
            sampled = sample(logits.sampling, out.sampling, self.scheduler.eos_token_ids)
            prompt_scores = self._prompt_scores(logits)
        except Exception as exc:  # keep serving the others; these rows fail with a message
            log.exception("forward pass failed for %d rows", len(out.rows))
            for row in out.rows:
                self.scheduler.finish(row.seq, FinishReason.ERROR)
                self._report_finish(row.seq, error=f"generation failed: {type(exc).__name__}")
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
            self._report_token(update, logprob, top)
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

    def _prompt_scores(self, logits: StepLogits) -> dict[int, tuple[int, list[PromptToken]]]:
        """Each scored prompt chunk as PromptTokens (the first prompt token, which nothing predicts, has none)."""
        scores: dict[int, tuple[int, list[PromptToken]]] = {}
        for chunk in logits.prompt:
            seq = chunk.seq
            done = seq.num_computed  # the chunk's first token (postprocess has not advanced it yet)
            entries = [] if done else [PromptToken(seq.prompt_ids[0], self._text(seq.prompt_ids[0]), None)]
            count = seq.params.prompt_logprobs or 0
            for target, (logprob, top) in zip(
                chunk.targets, prompt_logprobs(chunk.logits, chunk.targets, count), strict=True
            ):
                entries.append(PromptToken(target, self._text(target), logprob, self._alternatives(top)))
            scores[seq.seq_id] = (done + 1 if done else 0, entries)
        return scores

    def _text(self, token: int) -> str:
        return self.loaded.tokenizer.decode([token], skip_special_tokens=False)

    def _alternatives(self, top: TopLogprobs) -> tuple[TokenLogprob, ...]:
        return tuple(TokenLogprob(t, self._text(t), lp) for t, lp in top)

    def _report_token(self, update: TokenUpdate, logprob: float, top: TopLogprobs) -> None:
        seq, token = update.seq, update.token
        if token < 0:  # finished without a token: scored its prompt only, or failed
            self._report_finish(seq, error=update.error, prompt=update.prompt)
            return
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            metrics.TIME_TO_FIRST_TOKEN.observe(seq.first_token_time - seq.arrival_time)
        event = TokenEvent(
            token,
            self._text(token),
            logprob,
            token in self._special_ids,
            update.text_delta,
            update.finish_reason,
            update.error,
            self._alternatives(top),
            update.prompt,
        )
        self._emit(seq, event)
        if update.finish_reason is not None:
            self._report_finish(seq, emit=False)

    def _report_finish(
        self,
        seq: Sequence,
        error: str | None = None,
        emit: bool = True,
        prompt: tuple[PromptToken, ...] | None = None,
    ) -> None:
        """Metrics and the last event of a sequence the scheduler has finished."""
        reason = seq.finish_reason
        assert reason is not None
        seq.prefix = None  # the pool holds what running rows need; let the registry's memory go
        if emit:
            self._emit(seq, TokenEvent(-1, "", 0.0, False, "", reason, error, prompt=prompt))
        now = time.monotonic()
        metrics.REQUEST_COUNT.labels(reason.value).inc()
        if reason in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP_SEQUENCE):
            metrics.REQUEST_SUCCESS.inc()
        metrics.REQUEST_DURATION.observe(now - seq.arrival_time)
        metrics.GENERATED_TOKENS.inc(len(seq.output_ids))
        if seq.first_token_time is not None and len(seq.output_ids) > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))

    def _emit(self, seq: Sequence, event: TokenEvent) -> None:
        try:
            seq.sink(event)
        except Exception:
            log.exception("output sink failed; cancelling request %d", seq.seq_id)
            seq.cancelled = True

    # ----- the loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the step loop on a thread of its own (tests, benchmarks, embedding the engine)."""
        self._thread = threading.Thread(target=self.run_loop, name="prefixserve-engine", daemon=True)
        self._thread.start()

    def run_loop(self) -> None:
        """Step until `stop_accepting()` was called and no work is left. The server calls this on the main
        thread: oneDNN's kernels measured ~70% slower called from any other thread (bench/RESULTS.md)."""
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
            self._report_finish(seq, error=error)

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
