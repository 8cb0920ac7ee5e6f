"""Per-row next-token choice (greedy, or sampling with each row's own temperature/top-k/top-p/seed) and the
log-probabilities reported with it: the chosen token's, its most likely alternatives, and a prompt's.

Logits are first processed per row (logits_processors.py: penalties, bias, min tokens, grammar), then
temperature, top-k and top-p, transformers' order. Log-probabilities are the log-softmax of the model's raw
logits, what PEFT computes for the same adapter and prompt. A row
whose numbers went wrong (NaN or infinite logits, e.g. from an adapter with extreme values, or no token its
grammar allows) fails alone: the other rows of the step get exactly the tokens they would have got without it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from prefixserve.engine.logits_processors import process_logits
from prefixserve.engine.sequence import SamplingParams, Sequence

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first
NON_FINITE = (
    "the model produced NaN or infinite scores for this request (its adapter may hold extreme values)"
)
NOTHING_ALLOWED = "no token is left to choose for this request: its penalties, bias or grammar rule out all"


@dataclass
class Sampled:
    tokens: list[int]  # -1 for a failed row
    logprobs: list[float]
    top: list[TopLogprobs]  # per row: its `params.logprobs` most likely tokens (empty when 0)
    errors: dict[int, str] = field(default_factory=dict)  # rows that failed: a message each


GreedyPick = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # logits -> (tokens, log-probs)


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    eos_token_ids: Collection[int] = (),
    greedy: GreedyPick | None = None,
) -> Sampled:
    """Pick one token per row of `logits` ([rows, vocab], any float dtype). `greedy`, the native op
    (engine/cpu/csrc/greedy.cpp), serves a step whose rows all take the most likely token as it is and report
    no alternatives, in one pass over each row: most decode steps."""
    if greedy is not None and all(_plain_greedy(s) for s in seqs):
        tokens, chosen = greedy(logits)
        out, logprobs = tokens.tolist(), chosen.tolist()
        failed = {i: NON_FINITE for i, token in enumerate(out) if token < 0}
        for i in failed:
            logprobs[i] = 0.0
        return Sampled(out, logprobs, [[] for _ in seqs], failed)
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    # -inf is a masked token; NaN, +inf, or nothing finite at all is a failure (argmax would pick token 0,
    # often end-of-sequence, and the request would end looking successful).
    failed = {i: NON_FINITE for i in _broken(logits)}
    scores = process_logits(logits, seqs, eos_token_ids)
    if scores is not logits:  # processed rows may have lost every token
        for i in _broken(scores):
            failed.setdefault(i, NOTHING_ALLOWED)
    tokens = scores.max(dim=-1).indices  # the first best, as argmax, which is 2.8x slower on a CPU
    for i, seq in enumerate(seqs):
        if seq.params.do_sample and i not in failed:
            try:
                tokens[i] = _draw(scores[i], seq)
            except (RuntimeError, ValueError) as exc:  # torch's multinomial on a broken distribution
                failed[i] = f"sampling failed for this request: {exc}"
    for i in failed:
        tokens[i] = 0  # a placeholder to gather from; reported as -1
    chosen = logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
    out = tokens.tolist()
    for i in failed:
        out[i], chosen[i] = -1, 0.0
    return Sampled(out, chosen, top_logprobs(logprobs, [s.params.logprobs for s in seqs]), failed)


def _plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return not (p.do_sample or p.processes_logits or seq.constraint is not None or p.logprobs)


def _broken(scores: torch.Tensor) -> list[int]:
    """Rows with a NaN, a +inf, or no finite score. One reduction: a row's max is NaN if it holds one, +inf
    if it holds one, -inf if everything is masked (three elementwise passes cost ~70x more at 64 rows)."""
    return (~torch.isfinite(scores.amax(dim=-1))).nonzero().view(-1).tolist()


def top_logprobs(logprobs: torch.Tensor, counts: list[int]) -> list[TopLogprobs]:
    """The `counts[i]` most likely tokens of each row, one `topk` for all rows."""
    k = max(counts, default=0)
    if k == 0:
        return [[] for _ in counts]
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    pairs = [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return [row[:n] for row, n in zip(pairs, counts, strict=True)]


def prompt_logprobs(logits: torch.Tensor, targets: list[int], count: int) -> list[tuple[float, TopLogprobs]]:
    """Log-probability of each target token under the logits of the position before it, and the top `count`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device).view(-1, 1)).view(-1).tolist()
    top = top_logprobs(logprobs, [count] * len(targets))
    return list(zip(chosen, top, strict=True))


def _draw(scores: torch.Tensor, seq: Sequence) -> torch.Tensor:
    probs = torch.softmax(_check(filter_scores(scores, seq.params)), dim=-1)
    return torch.multinomial(probs, 1, generator=seq.generator)[0]


def _check(scores: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(scores.amax())):  # as _broken, for one row
        raise ValueError("the penalized or scaled scores are NaN or infinite")
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
