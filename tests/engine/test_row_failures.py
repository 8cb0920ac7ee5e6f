"""One request's numerical failure stays in its row: the other rows of the step go on, token for token."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import save, save_file

from prefixserve.engine.sampling import NON_FINITE, sample
from prefixserve.engine.sequence import FinishReason, SamplingParams, Sequence
from tests.engine_harness import make_engine, run_until_idle, submit
from tests.server_process import tiny_model_server, upload_files

NORMAL = [
    ("Once upon a time", None, {"max_new_tokens": 8}),
    ("The quick brown fox", "rand3", {"max_new_tokens": 8}),
    ("Hello", "rand8", {"max_new_tokens": 8, "do_sample": True, "seed": 3, "temperature": 0.7, "top_k": 20}),
    ("Hello there", None, {"max_new_tokens": 8, "repetition_penalty": 1.3}),
]
POISONED = [
    ("Hello", "huge", {"max_new_tokens": 8}),
    ("Hello", "huge", {"max_new_tokens": 8, "do_sample": True, "seed": 1}),
]


@pytest.fixture(scope="module")
def huge_adapter(adapter_dirs, tmp_path_factory):
    """Finite in fp32, so the upload is valid, but its keys overflow attention: the row's logits are NaN."""
    src = adapter_dirs["gpt2"]["rand3"]
    out = tmp_path_factory.mktemp("huge") / "huge"
    out.mkdir()
    shutil.copy(src / "adapter_config.json", out / "adapter_config.json")
    width = json.loads((src / "adapter_config.json").read_text())["token_dim"] * 2 * 2
    save_file({"prompt_embeddings": torch.full((3, width), 3e38)}, str(out / "adapter_model.safetensors"))
    return out


def _run(engine, requests):
    sinks = [submit(engine, prompt, adapter, **params) for prompt, adapter, params in requests]
    run_until_idle(engine)
    return sinks


def test_a_row_with_non_finite_scores_fails_alone(tiny_model_dirs, adapter_dirs, huge_adapter, tmp_path):
    adapters = {"rand3": adapter_dirs["gpt2"]["rand3"], "rand8": adapter_dirs["gpt2"]["rand8"]}
    alone = _run(make_engine(tiny_model_dirs["gpt2"], tmp_path / "a", adapters), NORMAL)
    engine = make_engine(tiny_model_dirs["gpt2"], tmp_path / "b", {**adapters, "huge": huge_adapter})
    mixed = _run(engine, POISONED[:1] + NORMAL + POISONED[1:])
    for reference, got in zip(alone, mixed[1:-1], strict=True):
        assert got.finish_reason is FinishReason.LENGTH
        assert got.tokens == reference.tokens and len(got.tokens) == 8
        assert [e.logprob for e in got.events] == [e.logprob for e in reference.events]
    for poisoned in (mixed[0], mixed[-1]):
        assert poisoned.tokens == []  # no silent end-of-sequence token for the greedy row either
        assert poisoned.finish_reason is FinishReason.ERROR and poisoned.events[-1].error == NON_FINITE
    assert not engine.scheduler.has_work() and engine.scheduler.blocks.num_used <= engine.pool.num_blocks


def test_sample_reports_broken_rows_and_leaves_the_others_exactly():
    def seq(**params) -> Sequence:
        s = Sequence([1], SamplingParams(**params), None, lambda e: None)
        s.generator = torch.Generator().manual_seed(5)
        return s

    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    broken = logits.clone()
    broken[1, 3] = float("nan")
    broken[2] = float("-inf")  # nothing left to choose from
    seqs = [seq(), seq(), seq(do_sample=True), seq(do_sample=True, seed=9)]
    out = sample(broken, seqs)
    tokens, logprobs = out.tokens, out.logprobs
    clean = sample(logits[[0, 3]], [seq(), seq(do_sample=True, seed=9)])
    assert out.errors.keys() == {1, 2} and tokens[1] == tokens[2] == -1
    assert [tokens[0], tokens[3]] == clean.tokens and [logprobs[0], logprobs[3]] == clean.logprobs


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    with tiny_model_server(tiny_model_dirs["gpt2"], tmp_path_factory.mktemp("rows")) as server:
        yield server


@pytest.mark.slow
def test_parameters_that_would_overflow_are_refused(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for params in (
            {"temperature": 1e-300, "do_sample": True},
            {"repetition_penalty": 1e-300},
            {"repetition_penalty": 1e300},
        ):
            r = c.post("/generate", json={"inputs": "Hi", "parameters": params})
            assert r.status_code == 422, (params, r.text)
            assert next(iter(params)) in r.json()["error"]
        for body in ({"temperature": 1e-300}, {"repetition_penalty": 1e-300}):
            r = c.post("/v1/completions", json={"prompt": "Hi", **body})
            assert r.status_code == 422 and next(iter(body)) in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_adapters_that_overflow_the_served_dtype_are_refused(server, adapter_dirs, huge_adapter):
    config = (adapter_dirs["gpt2"]["rand3"] / "adapter_config.json").read_bytes()
    width = json.loads(config)["token_dim"] * 2 * 2
    tensor = torch.full((3, width), 1e300, dtype=torch.float64)  # finite in fp64, inf in the served fp32
    files = [
        ("files", ("adapter_config.json", config, "application/json")),
        (
            "files",
            ("adapter_model.safetensors", save({"prompt_embeddings": tensor}), "application/octet-stream"),
        ),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.put("/v1/adapters/overflow", files=files)
        assert r.status_code == 422 and "overflow float32" in r.json()["error"], r.text
        # Finite in fp32 but extreme: accepted, and its requests fail with a message, alone.
        assert c.put("/v1/adapters/huge", files=upload_files(huge_adapter)).status_code == 201
        r = c.post(
            "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "huge", "max_new_tokens": 4}}
        )
        assert r.status_code == 424 and "NaN or infinite" in r.json()["error"], r.text
        ok = c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}})
        assert ok.status_code == 200
