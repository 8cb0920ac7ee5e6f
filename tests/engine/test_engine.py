"""Engine behaviour: stop sequences, EOS, cancellation, bounded queue, request validation."""

from __future__ import annotations

import logging
import random

import pytest

from prefixserve import metrics
from prefixserve.demo import DEMO_MODEL_DIR
from prefixserve.engine.detokenizer import OutputText
from prefixserve.engine.errors import QueueFullError, RequestValidationError
from prefixserve.engine.sequence import FinishReason
from tests.engine_harness import make_engine, run_until_idle, submit

PROMPT = "Once upon a time"


@pytest.fixture
def engine(tmp_path):
    return make_engine(DEMO_MODEL_DIR, tmp_path / "store")


def test_stop_sequence_truncates_and_is_never_streamed(engine):
    full = submit(engine, PROMPT, None, max_new_tokens=12)
    run_until_idle(engine)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    stopped = submit(engine, PROMPT, None, max_new_tokens=12, stop=("never-there", stop))
    run_until_idle(engine)
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.text == text[:cut]
    streamed = ""
    for event in stopped.events:
        streamed += event.text_delta
        assert stop not in streamed


def test_length_and_eos(engine):
    sink = submit(engine, PROMPT, None, max_new_tokens=5)
    run_until_idle(engine)
    assert sink.finish_reason is FinishReason.LENGTH and len(sink.tokens) == 5
    engine.scheduler.eos_token_ids = frozenset({sink.tokens[2]})
    eos = submit(engine, PROMPT, None, max_new_tokens=5)
    run_until_idle(engine)
    assert (
        eos.finish_reason is FinishReason.EOS
        and eos.tokens == sink.tokens[: sink.tokens.index(sink.tokens[2]) + 1]
    )


def test_cancelled_request_frees_its_row_at_the_next_step(engine):
    a = submit(engine, PROMPT, None, max_new_tokens=50)
    b = submit(engine, "Hello", None, max_new_tokens=50)
    engine.step()
    engine.step()
    assert engine.num_running == 2
    engine.cancel(engine.scheduler.running[0])
    engine.step()
    assert engine.num_running == 1
    assert a.finish_reason is FinishReason.CANCELLED
    run_until_idle(engine)
    assert len(b.tokens) == 50


def test_full_queue_is_a_typed_refusal(tmp_path):
    """Free rows count too: a burst fills the free rows first, then the queue, then gets refused."""
    engine = make_engine(DEMO_MODEL_DIR, tmp_path / "store", max_batch_size=1, max_queue_size=2)
    for _ in range(3):  # one for the free row, two for the queue
        submit(engine, PROMPT, None)
    with pytest.raises(QueueFullError, match="at capacity"):
        submit(engine, PROMPT, None)
    no_queue = make_engine(DEMO_MODEL_DIR, tmp_path / "store2", max_batch_size=1, max_queue_size=0)
    submit(no_queue, PROMPT, None)
    with pytest.raises(QueueFullError):
        submit(no_queue, PROMPT, None)


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be between 1"),
        ({"max_new_tokens": 250}, "max_new_tokens", "above max_total_tokens 256"),
        (
            {"do_sample": True, "temperature": 0.0},
            "temperature",
            "temperature must be between 0.01 and 100.0",
        ),
        ({"top_p": 1.5}, "top_p", "top_p must be in"),
        ({"top_k": 0}, "top_k", "top_k must be >= 1"),
        ({"stop": tuple(f"s{i}" for i in range(65))}, "stop", "at most 64"),
        ({"stop": ("",)}, "stop", "must not be empty"),
        ({"stop_token_ids": (10**7,)}, "stop_token_ids", r"token id 10000000 \(in stop_token_ids\)"),
    ],
)
def test_invalid_requests(engine, params, field, message):
    with pytest.raises(RequestValidationError, match=message) as refused:
        submit(engine, PROMPT * 3, None, **params)
    assert refused.value.field == field


def test_a_refusal_is_worded_in_each_apis_field_names(engine):
    """The engine names the field; the API words it (no rewriting of the message's text)."""
    with pytest.raises(RequestValidationError) as refused:
        submit(engine, PROMPT * 3, None, max_new_tokens=250)
    plain = str(refused.value)
    assert "prompt tokens" in plain and "max_new_tokens (250)" in plain
    openai = refused.value.worded({"max_new_tokens": "max_tokens", "prompt": "prompt"})
    assert "max_tokens (250)" in openai and "max_new_tokens" not in openai
    assert (
        refused.value.worded({"prompt": "inputs"}).count("inputs") == 2
    )  # "inputs tokens", "shorten the inputs"
    assert refused.value.field_name({"max_new_tokens": "max_tokens"}) == "max_tokens"


def test_empty_and_too_long_prompts(engine):
    with pytest.raises(RequestValidationError, match="must not be empty"):
        submit(engine, "", None)
    with pytest.raises(RequestValidationError, match="max_input_tokens"):
        submit(engine, "word " * 200, None)


def test_batch_never_exceeds_max_batch_size(tmp_path):
    engine = make_engine(DEMO_MODEL_DIR, tmp_path / "store", max_batch_size=3)
    sinks = [submit(engine, f"{PROMPT} {i}", None, max_new_tokens=4 + i) for i in range(7)]
    while engine.scheduler.has_work():
        engine.step()
        assert engine.num_running <= 3
    assert [len(s.tokens) for s in sinks] == [4 + i for i in range(7)]


def test_incomplete_utf8_is_held_back_then_flushed(engine):
    """Byte-level tokens that split a character emit nothing until it completes, and are flushed at the end."""
    tok = engine.loaded.tokenizer
    ids = tok.encode("ok €€")
    cut = ids[:-1]  # ends inside the last '€'
    assert tok.decode(cut).endswith("\ufffd")
    text = OutputText(tok, stop=())
    deltas = [text.add(i) for i in cut]
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + text.finish() == tok.decode(cut)
    whole = OutputText(tok, stop=())
    assert "".join(whole.add(i) for i in ids) + whole.finish() == "ok €€"


def test_the_earliest_of_several_stop_sequences_wins(engine):
    tok = engine.loaded.tokenizer
    ids = tok.encode("hello world and more")
    for stops in (("wor", " wo"), (" wo", "wor")):
        text = OutputText(tok, stop=stops)
        out = ""
        for i in ids:
            out += text.add(i)
            if text.stopped:
                break
        out += text.finish()
        assert out == "hello" and text.stopped, stops


def test_a_request_larger_than_the_whole_pool_is_refused(tmp_path, caplog):
    """Said at start-up (a pool that holds less than one row of --max-total-tokens), then per request (422)."""
    with caplog.at_level(logging.WARNING, logger="prefixserve.engine.engine"):
        engine = make_engine(DEMO_MODEL_DIR, tmp_path / "store", kv_cache_mb=0.125, block_size=4)
    assert "holds less than one row of --max-total-tokens 256" in caplog.text, caplog.text
    blocks = engine.pool.num_blocks
    with pytest.raises(RequestValidationError, match="more than the whole KV cache holds"):
        submit(engine, "hello", None, max_new_tokens=blocks * 4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefixserve.engine.engine"):
        make_engine(DEMO_MODEL_DIR, tmp_path / "store2", block_size=4)
    assert "less than one row" not in caplog.text


def test_a_tenant_is_not_stuck_behind_another_tenants_rows(tmp_path):
    engine = make_engine(DEMO_MODEL_DIR, tmp_path / "store", max_batch_size=2)
    hog = [submit(engine, PROMPT, None, tenant="a", max_new_tokens=40, ignore_eos=True) for _ in range(4)]
    engine.step()
    short = submit(engine, "Hello", None, tenant="b", max_new_tokens=5, ignore_eos=True)
    while short.finish_reason is None:
        engine.step()
    assert len(short.tokens) == 5 and not any(s.finish_reason for s in hog)
    run_until_idle(engine)
    assert [len(s.tokens) for s in hog] == [40] * 4


def test_the_batch_size_gauge_drops_to_zero_when_idle(engine):
    submit(engine, PROMPT, None, max_new_tokens=3)
    engine.step()
    assert metrics.BATCH_SIZE._value.get() == 1
    run_until_idle(engine)
    assert metrics.BATCH_SIZE._value.get() == 0


def _cut_at_first_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The reference: grow the text a character at a time; at the first character that ends a stop sequence,
    cut before the longest one ending there."""
    for i in range(1, len(text) + 1):
        ended = [len(s) for s in stops if text[:i].endswith(s)]
        if ended:
            return text[: i - max(ended)], True
    return text, False


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """The reference: the longest tail of `text` that is a proper prefix of some stop sequence."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@pytest.mark.parametrize("max_stops", [4, 64])
def test_stop_matching_agrees_with_the_reference_on_random_texts(engine, max_stops):
    rng = random.Random(max_stops)
    for _ in range(300):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 40)))
        stops = tuple(
            {
                "".join(rng.choice("ab ") for _ in range(rng.randint(1, 6)))
                for _ in range(rng.randint(1, max_stops))
            }
        )
        out = OutputText(engine.loaded.tokenizer, stops)
        released, at = "", 0
        while at < len(text) and not out.stopped:  # arbitrary chunks, as tokens decode
            step = rng.randint(1, 4)
            out._extend(text[at : at + step])
            released += out._release()
            at += step
            if not out.stopped:  # everything is released but what could still become a stop sequence
                assert len(out.text) - len(released) == _holdback(out.text, stops), (out.text, stops)
            for stop in stops:
                assert stop not in released
        released += out.finish()
        assert (released, out.stopped) == _cut_at_first_stop(text, stops), (text, stops)


def test_long_stop_sequences_are_refused(engine):
    with pytest.raises(RequestValidationError, match="at most 256 characters"):
        submit(engine, PROMPT, None, max_new_tokens=4, stop=("x" * 257,))


def test_stop_sequences_are_bounded_by_count_and_total_size(engine):
    with pytest.raises(RequestValidationError, match="stop holds 65 sequences; at most 64 are allowed"):
        submit(engine, PROMPT, None, max_new_tokens=4, stop=tuple(f"s{i}" for i in range(65)))
    with pytest.raises(RequestValidationError, match="hold 4352 characters in all; at most 4096"):
        submit(engine, PROMPT, None, max_new_tokens=4, stop=tuple(f"{i:02}" + "x" * 254 for i in range(17)))
    many = submit(engine, PROMPT, None, max_new_tokens=4, stop=tuple(f"{i:02}" + "x" * 62 for i in range(64)))
    run_until_idle(engine)
    assert len(many.tokens) == 4
