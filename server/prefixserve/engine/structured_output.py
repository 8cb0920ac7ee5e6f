"""Structured output: each row's grammar (a JSON schema, any JSON object, or a regex) as a token mask.

llguidance compiles a grammar in about a millisecond (lazily, as tokens are needed) and computes a row's
allowed tokens in tens of microseconds over a 32k vocabulary; xgrammar and outlines-core compiled the same
schemas 50x slower on this machine (bench/bench_grammar.py, bench/RESULTS.md). Every request carries its own
schema, so compile time is on the request's path, which decided the choice.

The compiler is built once per model (wrapping the tokenizer costs ~0.1-1 s, on the first constrained
request); each constrained sequence holds a `Constraint`: the grammar's state after the tokens so far.
"""

from __future__ import annotations

import json
import threading

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from prefixserve.engine.errors import RequestValidationError

# Compact JSON (no free whitespace): a model cannot stall in an endless run of spaces and newlines.
_JSON_DEFAULTS = {"whitespace_flexible": False}
KINDS = ("json_schema", "json_object", "regex")


class Constraint:
    """One row's grammar state: which tokens may come next, advanced by each token the row takes."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token: int) -> None:
        """Advance by `token`; the mask allowed it, so a refusal is a bug worth failing the row for."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete: the grammar allows nothing more."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos[0] if self._eos else None
                )
            return self._lltokenizer

    def constraint(self, kind: str, value: str) -> Constraint:
        """A fresh constraint for one request. Raises RequestValidationError saying why a grammar is refused."""
        grammar = self._grammar(kind, value)
        message = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)  # "" when usable
        if message:
            raise RequestValidationError(f"the {kind.replace('_', ' ')} cannot be used: {message}")
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar)
        if matcher.is_error():
            raise RequestValidationError(
                f"the {kind.replace('_', ' ')} cannot be used: {matcher.get_error()}"
            )
        return Constraint(matcher)

    @property
    def mask_words(self) -> int:
        return llguidance.torch.get_bitmask_shape(1, self._vocab_size)[1]

    @staticmethod
    def _grammar(kind: str, value: str) -> str:
        try:
            if kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, _JSON_DEFAULTS)
            if kind == "json_schema":
                schema = json.loads(value)
                if not isinstance(schema, dict):
                    raise RequestValidationError("a JSON schema must be a JSON object")
                return llguidance.LLMatcher.grammar_from_json_schema(schema, _JSON_DEFAULTS)
            if kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(value)
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise RequestValidationError(f"the {kind.replace('_', ' ')} cannot be used: {exc}") from exc
        raise RequestValidationError(f"unknown grammar kind {kind!r}; use one of {', '.join(KINDS)}")
