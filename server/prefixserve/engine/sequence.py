"""One `Sequence` per request: its prompt, adapter prefix, sampling parameters and output so far."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixserve.adapters.registry import LoadedPrefix
from prefixserve.engine.block_manager import RowBlocks
from prefixserve.engine.detokenizer import OutputText


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = None  # None: the engine's default, clamped to the room left in the row
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample


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
class TokenEvent:
    """What the engine reports after each step for one request."""

    token_id: int
    token_text: str
    logprob: float
    special: bool
    text_delta: str  # new output text that is safe to show (stop sequences held back)
    finish_reason: FinishReason | None = None
    error: str | None = None


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
    first_token_time: float | None = None
    admitted_time: float | None = None
    text: OutputText | None = None

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
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
