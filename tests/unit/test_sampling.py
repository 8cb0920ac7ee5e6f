"""Token choice without a model: greedy, penalties and filters in transformers' order, seeded sampling,
reported log-probabilities, logit processors (OpenAI penalties, bias, min tokens), grammar masks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from prefixserve.demo import DEMO_MODEL_DIR
from prefixserve.engine.errors import RequestValidationError
from prefixserve.engine.logits_processors import process_logits
from prefixserve.engine.sampling import filter_scores, make_generator, prompt_logprobs, sample
from prefixserve.engine.sequence import SamplingParams, Sequence
from prefixserve.engine.structured_output import GrammarCompiler


def seq(prompt=(1, 2), output=(), **params) -> Sequence:
    s = Sequence(list(prompt), SamplingParams(**params), None, lambda e: None)
    for t in output:
        s.append_output(t)
    if s.params.do_sample:
        s.generator = make_generator(s.params.seed or 0, torch.device("cpu"))
    return s


def test_greedy_rows_take_the_argmax_and_report_its_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    out = sample(logits, [seq(), seq()])
    assert not out.errors
    assert out.tokens == [1, 0]
    assert abs(out.logprobs[0] - torch.log_softmax(logits[0], -1)[1].item()) < 1e-6


def test_top_logprobs_are_the_most_likely_tokens_of_the_raw_logits_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [2.0, 0.0, 0.0, 1.0]])
    out = sample(logits, [seq(logprobs=3), seq(logprobs=0, logit_bias=((1, 100.0),))])
    reference = torch.log_softmax(logits, -1)
    assert [t for t, _ in out.top[0]] == [1, 3, 2]
    assert all(abs(lp - reference[0, t].item()) < 1e-6 for t, lp in out.top[0])
    assert out.top[1] == []
    # the bias changed the choice, the reported log-prob is the model's own for that token
    assert out.tokens[1] == 1 and abs(out.logprobs[1] - reference[1, 1].item()) < 1e-6


def test_prompt_logprobs_score_each_target_under_the_position_before_it():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    scored = prompt_logprobs(logits, [4, 5, 6], 2)
    reference = torch.log_softmax(logits, -1)
    for row, (target, (logprob, top)) in enumerate(zip([4, 5, 6], scored, strict=True)):
        assert abs(logprob - reference[row, target].item()) < 1e-6
        assert [t for t, _ in top] == reference[row].topk(2).indices.tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = process_logits(logits, [seq(prompt=[0], output=[1], repetition_penalty=2.0)], ())
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5]], "the raw logits stay as they were"


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(2, 4)
    rows = [
        seq(prompt=[3, 3], output=[1, 1, 2], frequency_penalty=0.5, presence_penalty=1.0),
        seq(output=[1]),  # no penalty: untouched
    ]
    out = process_logits(logits, rows, ())
    assert out[0].tolist() == [0.0, -2.0, -1.5, 0.0]
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_logit_bias_and_min_tokens_hold_off_end_of_sequence_and_stop_tokens():
    logits = torch.zeros(3, 5)
    rows = [
        seq(logit_bias=((2, 5.0), (3, -5.0))),
        seq(min_new_tokens=2, stop_token_ids=(4,), output=[1]),
        seq(min_new_tokens=1, stop_token_ids=(4,), output=[1]),  # reached: nothing held off
    ]
    out = process_logits(logits, rows, eos_token_ids=(0,))
    assert out[0].tolist() == [0.0, 0.0, 5.0, -5.0, 0.0]
    assert torch.isinf(out[1]).tolist() == [True, False, False, False, True]
    assert not torch.isinf(out[2]).any()


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    scores = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isinf(filter_scores(scores, SamplingParams(top_k=2))).tolist() == [True, False, False, True]
    kept = ~torch.isinf(filter_scores(scores, SamplingParams(top_p=0.5)))
    assert kept.tolist() == [False, True, False, False]


def test_seeded_rows_sample_the_same_alone_and_in_a_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    alone = sample(logits[1:2], [seq(do_sample=True, seed=42)]).tokens
    batch = sample(logits, [seq(), seq(do_sample=True, seed=42), seq(do_sample=True, seed=7)]).tokens
    assert batch[1] == alone[0]


@pytest.fixture(scope="module")
def grammars() -> GrammarCompiler:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


@pytest.mark.slow  # about 20 s here
def test_grammar_masks_make_random_logits_spell_a_document_of_the_schema(grammars):
    """Each row its own grammar, in one batch; random logits stand in for a model."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    rows = [seq(), seq(), seq()]
    rows[0].constraint = grammars.constraint("json_schema", json.dumps(schema))
    rows[1].constraint = grammars.constraint("regex", "[a-c]{3}-[0-9]{2}")
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        logits = torch.randn(3, len(tokenizer), generator=generator)
        tokens = sample(logits, rows, eos_token_ids=(0,)).tokens
        for row, token in zip(rows, tokens, strict=True):
            if row.constraint is not None and not row.constraint.done and token != 0:
                row.constraint.accept(token)
                row.append_output(token)
    document = json.loads(tokenizer.decode(rows[0].output_ids))
    assert set(document) == {"n", "ok"} and 0 <= document["n"] <= 99
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", tokenizer.decode(rows[1].output_ids))


def test_a_grammar_that_cannot_compile_is_refused_with_the_reason(grammars):
    with pytest.raises(RequestValidationError, match="regex"):
        grammars.constraint("regex", "a(b")
    with pytest.raises(RequestValidationError, match="JSON schema"):
        grammars.constraint("json_schema", "[1, 2]")


def test_a_row_with_non_finite_logits_or_nothing_allowed_fails_alone():
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    rows = [
        seq(),
        seq(),
        seq(do_sample=True, seed=1),
        seq(logit_bias=((0, -float("inf")), (1, -float("inf")), (2, -float("inf")))),
    ]
    out = sample(logits, rows)
    assert set(out.errors) == {1, 3} and out.tokens[1] == -1 and out.tokens[3] == -1
    alone = sample(logits[[0, 2]], [seq(), seq(do_sample=True, seed=1)])
    assert [out.tokens[0], out.tokens[2]] == alone.tokens
