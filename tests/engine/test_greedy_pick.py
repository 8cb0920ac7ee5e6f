"""The native greedy choice (engine/cpu/csrc/greedy.cpp) against torch's: the same token (the first of equal
maxima, as max().indices and argmax), the same log-probability, the same failed rows, and `sample` giving the
same answer with it as without it."""

from __future__ import annotations

import pytest
import torch

from prefixserve.engine.cpu.kernels import load_kernels
from prefixserve.engine.sampling import NON_FINITE, sample
from tests.unit.test_sampling import seq


@pytest.fixture(scope="module")
def greedy_pick():
    kernels, how = load_kernels()
    assert kernels is not None, how  # the suite's machines have a compiler: this path must be tested
    return kernels.greedy_pick


@pytest.mark.parametrize("vocab", [1, 7, 1024, 1025, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_token_and_its_logprob_are_torchs(greedy_pick, vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=gen) * 4).to(dtype)
    logits[1, vocab // 2 :] = logits[1].max()  # equal maxima: the first one wins
    logits[2] = -100.0  # all equal
    logits[3, 0] = 200.0  # a gap whose exp underflows for every other token
    tokens, logprobs = greedy_pick(logits)
    wide = logits.float()
    expected = wide.max(dim=-1).indices
    assert torch.equal(tokens, expected)
    want = torch.log_softmax(wide, dim=-1).gather(1, expected[:, None])[:, 0]
    torch.testing.assert_close(logprobs, want, rtol=0, atol=2e-6)


def test_rows_with_nan_or_infinity_or_nothing_finite_are_refused(greedy_pick):
    logits = torch.zeros(4, 3000)
    logits[0, 2999] = float("nan")  # in the last block
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")  # every token masked
    logits[3, 1234] = 1.0
    tokens, logprobs = greedy_pick(logits)
    assert tokens.tolist() == [-1, -1, -1, 1234]
    assert logprobs[3].item() == pytest.approx(torch.log_softmax(logits[3], -1)[1234].item(), abs=1e-6)


def test_sample_gives_the_same_answer_with_the_native_pick(greedy_pick):
    """Plain greedy rows take the native path; a step with a row asking for alternatives, a penalty or a seed
    takes torch's for all its rows: both give every row the same token, log-probability and failure."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 500, generator=gen) * 3).bfloat16()
    logits[2, 7] = float("nan")
    plain = [seq(), seq(), seq(), seq()]
    native, reference = sample(logits, plain, (), greedy_pick), sample(logits, plain)
    assert native.tokens == reference.tokens and native.tokens[2] == -1
    assert native.errors == reference.errors == {2: NON_FINITE}
    assert native.logprobs == pytest.approx(reference.logprobs, abs=1e-6)
    assert native.top == reference.top == [[], [], [], []]

    def mixed():  # fresh rows each time: a seeded row's generator advances as it draws
        return [seq(), seq(logprobs=2), seq(), seq(do_sample=True, seed=3)]

    assert sample(logits, mixed(), (), greedy_pick) == sample(logits, mixed())
