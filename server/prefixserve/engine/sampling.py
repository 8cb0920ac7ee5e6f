"""Per-row next-token choice: greedy, or sampling with each row's own temperature/top-k/top-p/seed.

Processing order follows transformers' `generate`: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import torch

from prefixserve.engine.sequence import SamplingParams, Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` ([rows, vocab], float32); return the tokens and their log-probs."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    special = [
        i for i, s in enumerate(seqs) if s.params.do_sample or s.params.repetition_penalty not in (None, 1.0)
    ]
    if special:
        tokens = tokens.clone()
        for i in special:
            tokens[i] = _choose(logits[i], seqs[i])
    chosen = logprobs.gather(1, tokens.view(-1, 1)).view(-1)
    return tokens.tolist(), chosen.tolist()


def _choose(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    params = seq.params
    scores = row.clone()
    if params.repetition_penalty not in (None, 1.0):
        scores = apply_repetition_penalty(scores, seq.prompt_ids + seq.output_ids, params.repetition_penalty)
    if not params.do_sample:
        return scores.argmax()
    scores = filter_scores(scores, params)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=seq.generator)[0]


def apply_repetition_penalty(scores: torch.Tensor, seen_ids: list[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(sorted(set(seen_ids)), device=scores.device, dtype=torch.long)
    seen = scores[ids]
    scores[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def filter_scores(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k is not None and 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return scores


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
