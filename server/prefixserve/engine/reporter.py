"""What a step's results become for the caller and the operator: one `TokenEvent` per new token (its text,
log-probability and alternatives) handed to the request's sink, the prompt's scores when asked for, the last
event of a finished request, and the request metrics (time to first token, per output token, durations)."""

from __future__ import annotations

import logging
import time

from transformers import PreTrainedTokenizerBase

from prefixserve import metrics
from prefixserve.engine.model_runner import StepLogits
from prefixserve.engine.sampling import TopLogprobs, prompt_logprobs
from prefixserve.engine.scheduler import TokenUpdate
from prefixserve.engine.sequence import FinishReason, PromptToken, Sequence, TokenEvent, TokenLogprob

log = logging.getLogger(__name__)


class Reporter:
    """Engine thread only; a sink must only hand its event over (to the API's event loop)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)

    def prompt_scores(self, logits: StepLogits) -> dict[int, tuple[int, list[PromptToken]]]:
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
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def _alternatives(self, top: TopLogprobs) -> tuple[TokenLogprob, ...]:
        return tuple(TokenLogprob(t, self._text(t), lp) for t, lp in top)

    def token(self, update: TokenUpdate, logprob: float, top: TopLogprobs) -> None:
        seq, token = update.seq, update.token
        if token < 0:  # finished without a token: scored its prompt only, or failed
            self.finish(seq, error=update.error, prompt=update.prompt)
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
            self.finish(seq, emit=False)

    def finish(
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
