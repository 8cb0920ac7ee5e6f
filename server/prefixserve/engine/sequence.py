"""One `Sequence` per request: its prompt, adapter prefix, sampling parameters and output so far."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixserve.adapters.kv_prefix import LoadedPrefix
from prefixserve.engine.block_manager import RowBlocks
from prefixserve.engine.detokenizer import OutputText
from prefixserve.engine.structured_output import Constraint

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the output: `kind` is "json_schema" (value: the schema as JSON text), "json_object"
    (any JSON object), "regex" or "lark". Compiled and checked when the request is submitted."""

    kind: str
    value: str = ""


# Ranges in which scaling fp32 logits cannot overflow (1e-300 is 0 in fp32: a division by zero). vLLM also
# treats temperatures below 0.01 as numerically unsafe.
TEMPERATURE_RANGE = (0.01, 100.0)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# Stop sequences: bounded by size, not by OpenAI's count of 4 (evaluation harnesses send a task's own stops
# and EOS besides). One automaton matches them all, so the cost per character does not grow with the count.
MAX_STOP_CHARS = 256  # per stop sequence
MAX_STOP_SEQUENCES = 64
MAX_STOP_TOTAL_CHARS = 4096  # all of a request's stop sequences together


@dataclass(frozen=True)
class SamplingParams:
    # None: the engine's default, clamped to the room left in the row. 0 is allowed only with
    # prompt_logprobs: the request scores its prompt and generates nothing (evaluation harnesses).
    max_new_tokens: int | None = None
    min_new_tokens: int = 0  # end-of-sequence, stop tokens and stop strings are held off until then
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None  # HF's: over prompt and output
    presence_penalty: float = 0.0  # OpenAI's: over the output so far
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int = 0  # most likely alternatives reported with each generated token
    prompt_logprobs: int | None = None  # None: not computed; n: each prompt token's log-prob and top n
    grammar: GrammarSpec | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    @property
    def processes_logits(self) -> bool:
        """Whether the raw logits are changed before the choice (penalties, bias, grammar, min tokens)."""
        return bool(
            self.repetition_penalty not in (None, 1.0)
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or self.grammar is not None
            or self.min_new_tokens
        )


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class PromptToken:
    token_id: int
    text: str
    logprob: float | None  # None for the first prompt token: nothing predicts it
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """What the engine reports after each step for one request. A request's first event carries its prompt's
    log-probabilities when they were asked for; with max_new_tokens=0 that is its only (finishing) event."""

    token_id: int  # -1: no token (a finish without one: cancelled, failed, or nothing to generate)
    token_text: str
    logprob: float  # the model's log-probability of the token (log-softmax of the raw logits)
    special: bool
    text_delta: str  # new output text that is safe to show (stop sequences held back)
    finish_reason: FinishReason | None = None
    error: str | None = None
    top: tuple[TokenLogprob, ...] = ()  # the `params.logprobs` most likely tokens at this step
    prompt: tuple[PromptToken, ...] | None = None


OutputSink = Callable[[TokenEvent], None]
_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request's tokens are `token_ids` = prompt + output. `num_computed` of them have keys/values in the
    pool (after the adapter prefix); each step feeds the next ones. A row whose last token is in samples the
    next token. A preempted row drops its blocks and starts over at 0: recomputing prompt + output so far."""

    prompt_ids: list[int]
    params: SamplingParams
    prefix: LoadedPrefix | None
    sink: OutputSink
    tenant: str = ""  # whose request: the waiting queue takes tenants in turn
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: RowBlocks = field(default_factory=RowBlocks)
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    num_preemptions: int = 0
    # time.monotonic() of its events, for metrics and traces: the adapter's lookup (a miss loads it from the
    # store) before `arrival_time`, the first admission (its prefill starts), the first token, the finish.
    adapter_load_start: float | None = None
    adapter_load_end: float | None = None
    admitted_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    text: OutputText | None = None
    constraint: Constraint | None = None  # the grammar's state, when the output is constrained
    prompt_logprobs: list[PromptToken] = field(default_factory=list)  # filled as the prompt is taken in
    prompt_reported: bool = False
    # The prompt cache (prefix_cache.py): the root of this request's chain (None: caching off), the keys of
    # its full blocks so far, and how many prompt tokens its first admission found cached.
    cache_root: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids) + self.output_ids

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    @property
    def prefix_key(self) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
        """Identifies the prefix's contents: rows with equal keys share its blocks in the pool."""
        p = self.prefix
        return None if p is None else (p.namespace, p.adapter_ids, p.sha256)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def cache_length(self) -> int:
        """Context positions this row occupies: prefix + tokens computed."""
        return self.num_virtual_tokens + self.num_computed

    def append_output(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether this step's prompt tokens still need their log-probabilities (not after a recompute)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
