"""Runs the frozen base model over one scheduled step: every row's new tokens in one flat forward pass.

Rows are concatenated without padding ([1, N] tokens; a decoding row adds one, a prompt chunk several), each
token with its own position (PEFT's rule: a row's first prompt token sits at position T, after its adapter's
T virtual tokens) and its own slot in the KV pool. Attention (paged_attention.py) reads each row's adapter
prefix from blocks shared by all rows on that adapter, then the row's own tokens. The LM head runs only for
the rows that sample a token this step, and at the prompt positions of rows that asked for their prompt's
log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.paged_attention import (
    BATCH_KWARG,
    AttentionBatch,
    RowAttention,
    decode_rows,
    group_rows,
)
from prefixserve.engine.scheduler import SchedulerOutput
from prefixserve.engine.sequence import Sequence


@dataclass
class PromptChunkLogits:
    """Logits at some of a row's prompt positions: row i predicts `targets[i]`, the prompt token after it."""

    seq: Sequence
    logits: torch.Tensor
    targets: list[int]


@dataclass
class StepLogits:
    sampling: torch.Tensor  # float32 [rows that sample, vocab], in `step.sampling` order
    prompt: list[PromptChunkLogits] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, pool: KVPool, paged_decode: Callable[..., torch.Tensor] | None = None
    ) -> None:
        """`paged_decode`: the native kernel for decoding rows (native.py); None: every row is grouped."""
        self.model = model
        self.pool = pool
        self.paged_decode = paged_decode
        self.device = pool.device
        # A ready 4-D mask makes transformers skip building one; paged attention does not read it.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> StepLogits:
        """Forward the step's tokens; return the logits of the rows that sample, and prompt positions asked for."""
        for slots, prefix in step.prefix_fills:
            self.pool.write_prefix(slots, prefix.kv)
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        attention: list[RowAttention] = []
        logits_at: list[int] = []
        prompt_at: list[tuple[Sequence, int, int, int]] = []  # (row, its first token, flat start, count)
        for row in step.rows:
            seq, n = row.seq, row.num_tokens
            done, start = seq.num_computed, len(ids)
            first_position = seq.num_virtual_tokens + done
            ids += seq.token_ids[done : done + n]
            positions += range(first_position, first_position + n)
            slot_mapping += seq.blocks.slots[done : done + n]
            attention.append(RowAttention(start, n, seq.blocks.prefix_slots, seq.blocks.slots[: done + n]))
            if row.samples:
                logits_at.append(start + n - 1)
            if seq.wants_prompt_logprobs:  # positions before the last prompt token predict prompt tokens
                scored = min(done + n, len(seq.prompt_ids) - 1) - done
                if scored > 0:
                    prompt_at.append((seq, done, start, scored))
        num_sampling = len(logits_at)
        for _, _, start, scored in prompt_at:
            logits_at += range(start, start + scored)
        tensor = self._tensor
        decoding = None
        if self.paged_decode is not None and (single := [r for r in attention if r.query_len == 1]):
            decoding = decode_rows(single, self.pool, self.paged_decode)
            attention = [r for r in attention if r.query_len != 1]
        batch = AttentionBatch(self.pool, tensor(slot_mapping), group_rows(attention, self.pool), decoding)
        logits = self.model(
            input_ids=tensor(ids)[None],
            position_ids=tensor(positions)[None],
            attention_mask=self._no_mask,
            use_cache=False,
            logits_to_keep=tensor(logits_at),
            **{BATCH_KWARG: batch},
        ).logits
        logits = logits[0]
        out = StepLogits(logits[:num_sampling].float())
        at = num_sampling
        for seq, done, _, scored in prompt_at:
            targets = seq.token_ids[done + 1 : done + 1 + scored]
            out.prompt.append(PromptChunkLogits(seq, logits[at : at + scored], targets))
            at += scored
        return out

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
