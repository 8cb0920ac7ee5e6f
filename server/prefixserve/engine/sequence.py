"""One `Sequence` per request: its prompt, adapter prefix, sampling parameters and output so far."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefixserve.adapters.registry import LoadedPrefix
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
    prompt_ids: list[int]
    params: SamplingParams
    prefix: LoadedPrefix | None
    sink: OutputSink
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_prefilled: int = 0  # prompt tokens already in the cache (long prompts go in over several steps)
    slot: int = -1
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    first_token_time: float | None = None
    admitted_time: float | None = None
    text: OutputText | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled == len(self.prompt_ids)

    @property
    def cache_length(self) -> int:
        """Entries in this row's KV cache: prefix + prompt so far + all outputs but the last (not yet fed back)."""
        return self.num_virtual_tokens + self.num_prefilled + max(len(self.output_ids) - 1, 0)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
