"""Runs the frozen base model over a batch of rows, each with its own adapter prefix.

Two small steps in the gpt-fast style: `prefill` (prompt tokens of rows joining the batch, a chunk at a time
for long prompts: prefix copied into the row first, chunks right-padded into one forward) and `decode` (one
token for every running row).
Both return next-token logits, one row per sequence, in float32.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from prefixserve.adapters.format import KVShape
from prefixserve.engine.kv_cache import SlotKVCache
from prefixserve.engine.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        shape: KVShape,
        max_rows: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
        pad_token_id: int = 0,
    ) -> None:
        self.model = model
        self.device = device
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        # On a GPU the whole cache is allocated up front: running out of memory at start-up beats failing
        # every running row the first time a long request makes the cache grow.
        initial = max_length if device.type == "cuda" else 256
        self.cache = SlotKVCache(shape, max_rows, max_length, dtype, device, initial_length=initial)
        self._bool_mask = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        self._mask_dtype = dtype

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], chunk_lens: list[int] | None = None) -> torch.Tensor:
        """Put the next `chunk_lens[i]` prompt tokens of each row into its cache (all that remain when None),
        advance `num_prefilled`, and return each row's logits after its last token of this chunk."""
        chunks = chunk_lens or [s.num_prompt_tokens - s.num_prefilled for s in seqs]
        starts = torch.tensor([s.num_virtual_tokens + s.num_prefilled for s in seqs])  # first cache index
        lens = torch.tensor(chunks)
        width = int(lens.max())
        self.cache.ensure_capacity(min(self.max_length, int(starts.max()) + width))
        capacity = self.cache.capacity
        for seq in seqs:
            if seq.prefix is not None and seq.num_prefilled == 0:
                self.cache.write_prefix(seq.slot, seq.prefix.kv)

        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        for i, (seq, n) in enumerate(zip(seqs, chunks, strict=True)):
            input_ids[i, :n] = torch.tensor(seq.prompt_ids[seq.num_prefilled : seq.num_prefilled + n])
        # A token's cache index is its position. Padding queries (past a row's chunk) write beyond what the row
        # has, where its next chunk or token overwrites them.
        index = starts[:, None] + torch.arange(width)[None, :]
        write_index = index.clamp(max=capacity - 1)
        read_length = min(capacity, int(index.max()) + 1)
        visible = torch.arange(read_length)[None, None, :] <= index[:, :, None]
        slots = [s.slot for s in seqs]
        adjacent = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if adjacent else torch.tensor(slots, device=self.device)
        batch_kv = self.cache.batch(rows, write_index.to(self.device), read_length)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=self._mask(visible),
            position_ids=index.clamp(max=self.max_length - 1).to(self.device),
            past_key_values=batch_kv,
            use_cache=True,
            logits_to_keep=(lens - 1).view(-1, 1).to(self.device),
        ).logits
        for seq, n in zip(seqs, chunks, strict=True):
            seq.num_prefilled += n
        return logits[:, -1, :].float()

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed back the last token of every running row (rows 0..n-1, in order) and return next-token logits.

        Rows still taking in a long prompt ride along with a padding token at their next free position (which
        their next chunk overwrites); their logits mean nothing."""
        n = len(seqs)
        positions = torch.tensor([s.cache_length for s in seqs])
        read_length = int(positions.max()) + 1
        self.cache.ensure_capacity(read_length)
        input_ids = torch.tensor([[s.output_ids[-1] if s.prefill_done else self.pad_token_id] for s in seqs])
        visible = torch.arange(read_length)[None, None, :] <= positions[:, None, None]
        batch_kv = self.cache.batch(slice(0, n), positions.view(n, 1).to(self.device), read_length)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=self._mask(visible),
            position_ids=positions.view(n, 1).to(self.device),
            past_key_values=batch_kv,
            use_cache=True,
        ).logits
        return logits[:, -1, :].float()

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[rows, queries, keys] visibility → the 4-D mask the attention implementation expects."""
        mask = visible[:, None].to(self.device)
        if self._bool_mask:
            return mask
        zero = torch.zeros((), dtype=self._mask_dtype, device=self.device)
        return torch.where(mask, zero, torch.finfo(self._mask_dtype).min)
