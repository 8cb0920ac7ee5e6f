"""prefixserve's own calls into transformers raise no deprecation warning (issue 17).

transformers 5.24 deprecated the models' `past_key_values` argument for `cache`; a warning from our calls is a
break announced for a later release. Each path that hands transformers a model input is run under a recorder:
the start-up self-check, an adapter from text, a served request, and training (where PEFT's own forward still
passes `past_key_values`: prefixserve.training filters that one warning, which is PEFT's to fix).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest

from prefixserve.demo import DEMO_MODEL_DIR
from prefixserve.engine.from_text import adapter_from_text
from prefixserve.engine.model_loader import load_model
from prefixserve.engine.self_check import check_prefix_serving
from prefixserve.training import train_adapter
from tests.engine_harness import make_engine, run_until_idle, submit


def deprecations(action: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(DEMO_MODEL_DIR), "cpu", "float32", 256)


def test_self_check(loaded):
    assert deprecations(lambda: check_prefix_serving(loaded)) == []


def test_adapter_from_text(loaded):
    assert deprecations(lambda: adapter_from_text(loaded, "You are a pirate.", False, 64, "tiny")) == []


def test_served_request(tmp_path):
    def serve_one() -> None:
        engine = make_engine(DEMO_MODEL_DIR, tmp_path / "store")
        sink = submit(engine, "Once upon a time", None, max_new_tokens=4)
        run_until_idle(engine)
        assert len(sink.tokens) == 4

    assert deprecations(serve_one) == []


@pytest.mark.parametrize("init", [{}, {"init": "text:You are a pirate."}])
def test_training(tmp_path, init):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": " Arr!"}) + "\n" for p in ("Hi", "Hello")))
    out = tmp_path / "out"
    assert deprecations(lambda: train_adapter("tiny", data, out, max_steps=2, progress=False, **init)) == []
