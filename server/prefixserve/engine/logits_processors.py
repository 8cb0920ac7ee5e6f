"""What changes a row's logits before its token is chosen, vectorized over the rows that ask for it.

Order (transformers' `generate` for the first, then OpenAI's and vLLM's): repetition penalty over prompt and
output, presence and frequency penalties over the output, logit bias, end-of-sequence and stop tokens held
off until `min_new_tokens`, then the grammar's mask. Temperature, top-k and top-p come after (sampling.py).
Reported log-probabilities are taken from the logits before any of this, as vLLM and PEFT see them.
"""

from __future__ import annotations

from collections.abc import Collection

import llguidance.torch
import torch

from prefixserve.engine.sequence import Sequence


def process_logits(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int]
) -> torch.Tensor:
    """Return the logits to choose from ([rows, vocab]); `logits` itself is left as it is."""
    rows = [i for i, s in enumerate(seqs) if s.params.processes_logits or s.constraint is not None]
    if not rows:
        return logits
    out = logits.clone()
    group = [seqs[i] for i in rows]
    index = torch.tensor(rows, device=logits.device)
    sub = out[index]
    _repetition_penalty(sub, group)
    _presence_frequency(sub, group)
    _logit_bias(sub, group)
    _min_tokens(sub, group, eos_token_ids)
    _grammar(sub, group)
    out[index] = sub
    return out


def _padded(id_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(ids) for ids in id_lists))
    return torch.tensor([ids + [pad] * (width - len(ids)) for ids in id_lists], device=device)


def _repetition_penalty(sub: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty not in (None, 1.0)]
    if not rows:
        return
    vocab = sub.shape[1]
    ids = _padded([seqs[i].token_ids for i in rows], vocab, sub.device)  # pad: one column past the vocab
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=sub.device).scatter_(1, ids, True)
    seen = seen[:, :vocab]
    penalty = torch.tensor([[seqs[i].params.repetition_penalty] for i in rows], device=sub.device)
    part = sub[rows]
    penalized = torch.where(part < 0, part * penalty, part / penalty)
    sub[rows] = torch.where(seen, penalized, part)


def _presence_frequency(sub: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    if not rows:
        return
    vocab = sub.shape[1]
    ids = _padded([seqs[i].output_ids for i in rows], vocab, sub.device)
    counts = torch.zeros(len(rows), vocab + 1, device=sub.device, dtype=sub.dtype)
    counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=sub.dtype))[:, :vocab]
    frequency = torch.tensor([[seqs[i].params.frequency_penalty] for i in rows], device=sub.device)
    presence = torch.tensor([[seqs[i].params.presence_penalty] for i in rows], device=sub.device)
    sub[rows] -= frequency * counts + presence * (counts > 0).to(sub.dtype)


def _logit_bias(sub: torch.Tensor, seqs: list[Sequence]) -> None:
    entries = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias]
    if not entries:
        return
    rows, tokens, bias = zip(*entries, strict=True)
    index = (torch.tensor(rows, device=sub.device), torch.tensor(tokens, device=sub.device))
    sub.index_put_(index, torch.tensor(bias, device=sub.device, dtype=sub.dtype), accumulate=True)


def _min_tokens(sub: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int]) -> None:
    for i, seq in enumerate(seqs):
        p = seq.params
        if len(seq.output_ids) < p.min_new_tokens:
            held = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            sub[i, held] = float("-inf")


def _grammar(sub: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
    if not rows:
        return
    shape = llguidance.torch.get_bitmask_shape(len(rows), sub.shape[1])
    bitmask = torch.full(shape, -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        constraint = seqs[i].constraint
        assert constraint is not None
        constraint.fill_mask(bitmask, j)
    part = sub[rows].cpu()
    llguidance.torch.apply_token_bitmask_inplace(part, bitmask)
    sub[rows] = part.to(sub.device)
