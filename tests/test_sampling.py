"""Token choice without a model: greedy, penalties and filters in transformers' order, seeded sampling."""

from __future__ import annotations

import torch

from prefixserve.engine.sampling import apply_repetition_penalty, filter_scores, make_generator, sample
from prefixserve.engine.sequence import SamplingParams, Sequence


def seq(**params) -> Sequence:
    s = Sequence([1, 2], SamplingParams(**params), None, lambda e: None)
    if s.params.do_sample:
        s.generator = make_generator(s.params.seed or 0, torch.device("cpu"))
    return s


def test_greedy_rows_take_the_argmax_and_report_its_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    tokens, logprobs = sample(logits, [seq(), seq()])
    assert tokens == [1, 0]
    assert abs(logprobs[0] - torch.log_softmax(logits[0], -1)[1].item()) < 1e-6


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    scores = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), [0, 1], 2.0)
    assert scores.tolist() == [1.0, -4.0, 1.0]


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    scores = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isinf(filter_scores(scores, SamplingParams(top_k=2))).tolist() == [True, False, False, True]
    kept = ~torch.isinf(filter_scores(scores, SamplingParams(top_p=0.5)))
    assert kept.tolist() == [False, True, False, False]


def test_seeded_rows_sample_the_same_alone_and_in_a_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    alone = sample(logits[1:2], [seq(do_sample=True, seed=42)])[0]
    batch = sample(logits, [seq(), seq(do_sample=True, seed=42), seq(do_sample=True, seed=7)])[0]
    assert batch[1] == alone[0]
