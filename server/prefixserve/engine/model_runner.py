"""Runs the frozen base model over one scheduled step: every row's new tokens in one flat forward pass.

`prepare` turns the scheduler's rows into a `StepBatch` of plain tensors (token ids, positions, the pool slot
of each new token, where logits are read, and the attention backend's metadata, built from block tables);
`execute` runs the model over it. Rows are concatenated without padding ([1, N] tokens; a decoding row adds
one, a prompt chunk several), each token with its own position (PEFT's rule: a row's first prompt token sits
at position T, after its adapter's T virtual tokens) and its own slot in the KV pool. Attention
(engine/attention/) reads each row's adapter prefix from blocks shared by all rows on that adapter, then the
row's own tokens. The LM head runs only for the rows that sample a token this step, and at the prompt
positions of rows that asked for their prompt's log-probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from prefixserve.adapters.kv_prefix import LoadedPrefix
from prefixserve.engine.attention import BATCH_KWARG, AttentionBackend, AttentionBatch
from prefixserve.engine.attention.layout import StepLayout
from prefixserve.engine.attention.native_decode import NativeDecodeBackend
from prefixserve.engine.attention.portable import PortableBackend
from prefixserve.engine.cpu.kernels import Kernels
from prefixserve.engine.cpu.native_layers import install_native_layers
from prefixserve.engine.cpu.step_forward import StepForward, step_forward_for
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.scheduler import SchedulerOutput
from prefixserve.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class PromptChunkLogits:
    """Logits at some of a row's prompt positions: row i predicts `targets[i]`, the prompt token after it."""

    seq: Sequence
    logits: torch.Tensor
    targets: list[int]


@dataclass
class StepLogits:
    sampling: torch.Tensor  # [rows that sample, vocab] in the model's dtype, in `step.sampling` order
    prompt: list[PromptChunkLogits] = field(default_factory=list)


@dataclass
class PromptScoring:
    """A row whose prompt tokens from `first` on are scored this step: `count` logits, read from the flat
    tokens at `start`, predict prompt tokens first + 1 ... first + count."""

    seq: Sequence
    first: int
    start: int
    count: int


@dataclass
class StepBatch:
    """One step's inputs: plain tensors on the model's device, and the attention metadata built from them."""

    input_ids: torch.Tensor  # [N] the new tokens of every row, row after row
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] the pool slot each new token's keys/values go to
    logits_indices: (
        torch.Tensor
    )  # [rows that sample + scored prompt tokens] flat tokens whose logits are read
    num_sampling: int  # the first this many of logits_indices are the sampling rows'
    layout: StepLayout
    attention: Any  # the backend's metadata
    prefix_fills: list[tuple[list[int], LoadedPrefix]] = field(default_factory=list)  # blocks to write first
    scoring: list[PromptScoring] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: PreTrainedModel, pool: KVPool, kernels: Kernels | None = None) -> None:
        """With `kernels` (engine/cpu/kernels.py): the native attention backend and layer ops; without, plain
        PyTorch throughout (the portable backend)."""
        self.model = model
        self.pool = pool
        self.backend: AttentionBackend = PortableBackend()
        self.step_forward: StepForward | None = None
        if kernels is not None:
            self.backend = NativeDecodeBackend(kernels.paged_decode, kernels.store_kv)
            log.info("native layer ops for %d modules", install_native_layers(model, kernels))
            self.step_forward = step_forward_for(model, kernels, pool.dtype)
            if self.step_forward is not None:
                log.info(
                    "steps run %s's layers directly (%s)",
                    type(model).__name__,
                    type(self.step_forward).__name__,
                )
        self.device = pool.device
        # A ready 4-D mask makes transformers skip building one; paged attention does not read it.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)

    def run(self, step: SchedulerOutput) -> StepLogits:
        """Forward the step's tokens; return the logits of the rows that sample, and prompt positions asked for."""
        return self.execute(self.prepare(step))

    @torch.inference_mode()
    def prepare(self, step: SchedulerOutput) -> StepBatch:
        """The step as tensors. Python works per row and per block here, never per token of context."""
        ids: list[int] = []
        query_starts, computed, virtual = [0], [], []
        prefix_lens, own_lens, prefix_blocks, own_blocks = [], [], [], []
        sampling_at: list[int] = []
        scoring: list[PromptScoring] = []
        for row in step.rows:
            seq, n = row.seq, row.num_tokens
            done, start = seq.num_computed, len(ids)
            ids += seq.token_ids[done : done + n]
            query_starts.append(start + n)
            computed.append(done)
            virtual.append(seq.num_virtual_tokens)
            prefix_lens.append(seq.blocks.prefix_len)
            own_lens.append(done + n)
            prefix_blocks.append(seq.blocks.prefix_blocks)
            own_blocks.append(seq.blocks.blocks)
            if row.samples:
                sampling_at.append(start + n - 1)
            if seq.wants_prompt_logprobs:  # positions before the last prompt token predict prompt tokens
                scored = min(done + n, len(seq.prompt_ids) - 1) - done
                if scored > 0:
                    scoring.append(PromptScoring(seq, done, start, scored))
        device, size = self.device, self.pool.block_size
        layout = StepLayout.build(
            size, query_starts, prefix_lens, own_lens, prefix_blocks, own_blocks, device
        )

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        query_lens = tensor(query_starts).diff()
        row_of = torch.repeat_interleave(torch.arange(len(own_lens), device=device), query_lens)
        first = tensor(computed) - tensor(query_starts[:-1])  # own position of a row's flat token 0
        own_position = torch.arange(len(ids), device=device) + first[row_of]
        slot_mapping = layout.block_table[row_of, own_position // size] * size + own_position % size
        logits_at = sampling_at + [i for s in scoring for i in range(s.start, s.start + s.count)]
        return StepBatch(
            tensor(ids),
            own_position + tensor(virtual)[row_of],
            slot_mapping,
            tensor(logits_at),
            len(sampling_at),
            layout,
            self.backend.build(layout, self.pool),
            step.prefix_fills,
            scoring,
        )

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepLogits:
        for blocks, prefix in batch.prefix_fills:
            self.pool.write_prefix(blocks, prefix.kv)
        attention = AttentionBatch(self.pool, batch.slot_mapping, self.backend, batch.attention)
        if self.step_forward is not None:
            logits = self.step_forward(batch.input_ids, batch.positions, attention, batch.logits_indices)
        else:
            logits = self.model(
                input_ids=batch.input_ids[None],
                position_ids=batch.positions[None],
                attention_mask=self._no_mask,
                use_cache=False,
                logits_to_keep=batch.logits_indices,
                **{BATCH_KWARG: attention},
            ).logits[0]
        out = StepLogits(logits[: batch.num_sampling])
        at = batch.num_sampling
        for s in batch.scoring:
            targets = s.seq.token_ids[s.first + 1 : s.first + 1 + s.count]
            out.prompt.append(PromptChunkLogits(s.seq, logits[at : at + s.count], targets))
            at += s.count
        return out
