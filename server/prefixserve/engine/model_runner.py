"""Runs the frozen base model over one scheduled step: every row's new tokens in one flat forward pass.

Rows are concatenated without padding ([1, N] tokens; a decoding row adds one, a prompt chunk several), each
token with its own position (PEFT's rule: a row's first prompt token sits at position T, after its adapter's
T virtual tokens) and its own slot in the KV pool. Attention (paged_attention.py) reads each row's adapter
prefix from blocks shared by all rows on that adapter, then the row's own tokens. The LM head runs only for
the rows that sample a token this step.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.paged_attention import BATCH_KWARG, AttentionBatch, RowAttention, group_rows
from prefixserve.engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: PreTrainedModel, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.device = pool.device
        # A ready 4-D mask makes transformers skip building one; paged attention does not read it.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> torch.Tensor:
        """Forward the step's tokens; return float32 logits [rows that sample, vocab], in `step.sampling` order."""
        for slots, prefix in step.prefix_fills:
            self.pool.write_prefix(slots, prefix.kv)
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        attention: list[RowAttention] = []
        logits_at: list[int] = []
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
        tensor = self._tensor
        batch = AttentionBatch(self.pool, tensor(slot_mapping), group_rows(attention, self.pool))
        logits = self.model(
            input_ids=tensor(ids)[None],
            position_ids=tensor(positions)[None],
            attention_mask=self._no_mask,
            use_cache=False,
            logits_to_keep=tensor(logits_at),
            **{BATCH_KWARG: batch},
        ).logits
        return logits[0].float()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
