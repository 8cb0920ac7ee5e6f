"""Request validation: whether the engine can serve a request as asked, before it is queued.

Each refusal is a RequestValidationError naming the field at fault, worded with placeholders so that each API
names its fields its own way (api/field_names.py). The rule for `max_new_tokens` lives here only: the default
when a request gives none (the server's default, within the room the row has left) and its bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from prefixserve.engine.block_manager import blocks_for
from prefixserve.engine.errors import RequestValidationError
from prefixserve.engine.limits import EngineLimits
from prefixserve.engine.prefix_cache import MAX_CACHE_SALT_CHARS
from prefixserve.engine.sequence import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOTAL_CHARS,
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_RANGE,
    SamplingParams,
)

invalid = RequestValidationError.about


@dataclass(frozen=True)
class RequestValidator:
    limits: EngineLimits
    max_length: int  # max_total_tokens: virtual + prompt + new tokens of one row
    vocab_size: int
    block_size: int
    num_blocks: int  # the whole KV pool

    def check(
        self, prompt_ids: list[int], num_virtual: int, params: SamplingParams, cache_salt: str | None
    ) -> SamplingParams:
        """`params` with `max_new_tokens` resolved; raises RequestValidationError."""
        self._check_prompt(prompt_ids, num_virtual)
        params = replace(params, max_new_tokens=self._max_new_tokens(prompt_ids, num_virtual, params))
        self._check_room(prompt_ids, num_virtual, params.max_new_tokens)
        self._check_sampling(params)
        self._check_stop(params)
        if cache_salt is not None and not (
            isinstance(cache_salt, str) and 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS
        ):
            raise invalid(
                "cache_salt",
                "{cache_salt} must be a string of 1 to {most} characters (it narrows which requests may share "
                "cached prompt blocks), or left out",
                most=MAX_CACHE_SALT_CHARS,
            )
        return params

    def context_left(self, num_virtual: int) -> str:
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

    def _check_prompt(self, prompt_ids: list[int], num_virtual: int) -> None:
        if not prompt_ids:
            raise invalid("prompt", "{prompt} must not be empty: give at least one token of prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise invalid(
                "prompt",
                "{prompt} token ids must be in [0, {vocab}), the model's vocabulary",
                vocab=self.vocab_size,
            )
        if len(prompt_ids) > self.limits.max_input_tokens:
            raise invalid(
                "prompt",
                "{prompt} has {n} tokens, above this server's max_input_tokens of {most}; {context}",
                n=len(prompt_ids),
                most=self.limits.max_input_tokens,
                context=self.context_left(num_virtual),
            )

    def _max_new_tokens(self, prompt_ids: list[int], num_virtual: int, p: SamplingParams) -> int:
        if p.max_new_tokens is None:
            room = self.max_length - num_virtual - len(prompt_ids)
            return max(1, min(self.limits.default_max_new_tokens, room))
        scoring = p.max_new_tokens == 0 and p.prompt_logprobs is not None
        if not (1 <= p.max_new_tokens <= self.limits.max_new_tokens or scoring):
            raise invalid(
                "max_new_tokens",
                "{max_new_tokens} must be between 1 and {most}, got {got} (0 only {scoring})",
                most=self.limits.max_new_tokens,
                got=p.max_new_tokens,
            )
        return p.max_new_tokens

    def _check_room(self, prompt_ids: list[int], num_virtual: int, max_new_tokens: int) -> None:
        """The row must fit the model's context and the KV pool, its new tokens included."""
        prompt, total = len(prompt_ids), num_virtual + len(prompt_ids) + max_new_tokens
        if total > self.max_length:
            raise invalid(
                "max_new_tokens",
                "adapter virtual tokens ({virtual}) + {prompt} tokens ({n}) + {max_new_tokens} ({new}) = {total}, "
                "above max_total_tokens {most}: shorten the {prompt} or lower {max_new_tokens}; {context}",
                virtual=num_virtual,
                n=prompt,
                new=max_new_tokens,
                total=total,
                most=self.max_length,
                context=self.context_left(num_virtual),
            )
        blocks = blocks_for(num_virtual, self.block_size) + blocks_for(
            prompt + max_new_tokens, self.block_size
        )
        if blocks > self.num_blocks:
            raise invalid(
                "prompt",
                "this request needs {blocks} KV blocks ({virtual} virtual + {n} prompt + {new} new tokens), more "
                "than the whole KV cache holds ({pool}); shorten it, or start the server with a larger --kv-cache-mb",
                blocks=blocks,
                virtual=num_virtual,
                n=prompt,
                new=max_new_tokens,
                pool=self.num_blocks,
            )

    def _check_sampling(self, p: SamplingParams) -> None:
        if not 0 <= p.min_new_tokens <= p.max_new_tokens:
            raise invalid(
                "min_new_tokens",
                "{min_new_tokens} must be between 0 and {max_new_tokens} ({most}), got {got}",
                most=p.max_new_tokens,
                got=p.min_new_tokens,
            )
        for name, count in (("logprobs", p.logprobs), ("prompt_logprobs", p.prompt_logprobs or 0)):
            if not 0 <= count <= MAX_LOGPROBS:
                raise invalid(
                    name,
                    f"{{{name}}} must be between 0 and {{most}}, got {{got}}",
                    most=MAX_LOGPROBS,
                    got=count,
                )
        for name, ids in (("logit_bias", [t for t, _ in p.logit_bias]), ("stop_token_ids", p.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise invalid(
                    name,
                    f"token id {{bad}} (in {{{name}}}) is outside the vocabulary [0, {{vocab}})",
                    bad=bad[0],
                    vocab=self.vocab_size,
                )
        low, high = TEMPERATURE_RANGE
        if p.do_sample and not low <= p.temperature <= high:
            raise invalid(
                "temperature",
                "{temperature} must be between {low} and {high} when sampling, got {got} "
                "(for greedy decoding turn sampling off)",
                low=low,
                high=high,
                got=p.temperature,
            )
        if p.top_k is not None and p.top_k < 1:
            raise invalid("top_k", "{top_k} must be >= 1, got {got}", got=p.top_k)
        if p.top_p is not None and not 0 < p.top_p <= 1:
            raise invalid("top_p", "{top_p} must be in (0, 1], got {got}", got=p.top_p)
        low, high = REPETITION_PENALTY_RANGE
        if p.repetition_penalty is not None and not low <= p.repetition_penalty <= high:
            raise invalid(
                "repetition_penalty",
                "{repetition_penalty} must be between {low} and {high}, got {got}",
                low=low,
                high=high,
                got=p.repetition_penalty,
            )

    def _check_stop(self, p: SamplingParams) -> None:
        if len(p.stop) > MAX_STOP_SEQUENCES:
            raise invalid(
                "stop",
                "{stop} holds {n} sequences; at most {most} are allowed ({chars} characters in all)",
                n=len(p.stop),
                most=MAX_STOP_SEQUENCES,
                chars=MAX_STOP_TOTAL_CHARS,
            )
        if any(not s for s in p.stop):
            raise invalid("stop", "{stop} sequences must not be empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in p.stop):
            raise invalid(
                "stop", "{stop} sequences may have at most {most} characters each", most=MAX_STOP_CHARS
            )
        if (total := sum(map(len, p.stop))) > MAX_STOP_TOTAL_CHARS:
            raise invalid(
                "stop",
                "{stop} sequences hold {total} characters in all; at most {most} are allowed",
                total=total,
                most=MAX_STOP_TOTAL_CHARS,
            )
