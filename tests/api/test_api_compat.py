"""Unmodified clients over real HTTP: log-probabilities against PEFT, vLLM's sampling extensions, penalties,
structured output per row, tokenize/detokenize, OpenAI's error shape, CORS; TGI's and LoRAX's own clients."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch

from prefixserve.demo import DEMO_MODEL_DIR
from tests.paths import REPO_ROOT
from tests.server_process import ServerProcess, upload_files
from tests.tiny_models import make_adapter, peft_logprobs, tokenizer

pytestmark = pytest.mark.slow  # a server process for the module

PROMPT = "Once upon a time"
# The TGI and LoRAX clients pin huggingface_hub < 1, which transformers 5 cannot use: they live in their own
# virtual environment, made by scripts/setup-dev.sh (the README's test set-up) from requirements/clients.txt.
CLIENTS_PYTHON = REPO_ROOT / ".venv-clients" / "bin" / "python"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat-adapters")
    return {
        "pirate": make_adapter(DEMO_MODEL_DIR, root / "pirate", 6, "random", seed=1),
        "support": make_adapter(DEMO_MODEL_DIR, root / "support", 4, "random", seed=2),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapters):
    tmp = tmp_path_factory.mktemp("compat")
    proc = ServerProcess(
        ["--adapter-dir", str(tmp / "store"), "--cors-allow-origins", "http://app.example.test"],
        tmp / "server.log",
    )
    try:
        proc.wait_healthy()
        for name, path in adapters.items():
            r = httpx.put(f"{proc.url}/v1/adapters/{name}", files=upload_files(path))
            assert r.status_code == 201, r.text
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


# ----- log-probabilities --------------------------------------------------------------------------------------
def test_echo_scores_the_prompt_as_peft_does(client, adapters):
    ids = tokenizer(DEMO_MODEL_DIR).encode(PROMPT)
    out = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=0, echo=True, logprobs=5)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == PROMPT and out.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    reference = peft_logprobs(DEMO_MODEL_DIR, adapters["pirate"], ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - reference[i - 1, ids[i]].item()) < 1e-4
        top = reference[i - 1].topk(5)
        expected = {
            tokenizer(DEMO_MODEL_DIR).decode([t]): v
            for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        }
        for text, value in expected.items():
            assert abs(lp.top_logprobs[i][text] - value) < 1e-4


def test_generated_tokens_logprobs_and_top_logprobs_equal_peft(client, server, adapters):
    ids = tokenizer(DEMO_MODEL_DIR).encode(PROMPT)
    out = client.completions.create(
        model="support", prompt=ids, max_tokens=6, temperature=0, logprobs=3, echo=True
    )
    lp = out.choices[0].logprobs
    generated = lp.tokens[len(ids) :]
    assert len(generated) == 6
    chat = client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 4 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    # teacher-forced PEFT over prompt + the server's greedy tokens: every reported value is PEFT's
    tok = tokenizer(DEMO_MODEL_DIR)
    details = httpx.post(
        f"{server.url}/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"adapter_id": "support", "max_new_tokens": 6, "details": True},
        },
    ).json()["details"]
    full = ids + [t["id"] for t in details["tokens"]]
    reference = peft_logprobs(DEMO_MODEL_DIR, adapters["support"], full)
    for k in range(6):
        position = len(ids) - 1 + k
        assert abs(lp.token_logprobs[len(ids) + k] - reference[position, full[position + 1]].item()) < 1e-4
        top = reference[position].topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert abs(lp.top_logprobs[len(ids) + k][tok.decode([t])] - v) < 1e-4


# ----- vLLM's sampling extensions -----------------------------------------------------------------------------
def test_min_tokens_stop_token_ids_ignore_eos_and_special_tokens(client):
    first = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0)
    first_text = first.choices[0].logprobs.tokens[0]
    first_id = tokenizer(DEMO_MODEL_DIR).encode(first_text)[0]
    stopped = client.completions.create(
        model="pirate", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [first_id]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = client.completions.create(
        model="pirate",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [first_id], "min_tokens": 4},
    )
    assert held.usage.completion_tokens >= 4
    # Force end-of-sequence (id 0) with logit_bias: ignore_eos keeps going; special tokens shown on request.
    forced = {"logit_bias": {"0": 100}, "max_tokens": 3, "temperature": 0}
    ended = client.completions.create(model="pirate", prompt=PROMPT, **forced)
    assert ended.usage.completion_tokens == 1 and ended.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        model="pirate", prompt=PROMPT, **forced, extra_body={"ignore_eos": True, "skip_special_tokens": False}
    )
    assert kept.usage.completion_tokens == 3 and kept.choices[0].text == "<|endoftext|>" * 3
    hidden = client.completions.create(
        model="pirate", prompt=PROMPT, **forced, extra_body={"ignore_eos": True}
    )
    assert hidden.choices[0].text == ""


def test_stop_string_included_on_request_and_continuous_usage(client):
    whole = (
        client.completions.create(model="pirate", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    )
    stop = whole[3:5]
    cut = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    kept = client.completions.create(
        model="pirate",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    at = whole.find(stop)
    assert cut.choices[0].text == whole[:at] and kept.choices[0].text == whole[: at + len(stop)]
    chunks = list(
        client.completions.create(
            model="pirate",
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and chunks[-1].usage.completion_tokens == 5


def test_penalties_and_logit_bias_equal_a_reference_on_peft_logits(client, adapters):
    """Greedy with presence/frequency penalties, recomputed step by step on PEFT's logits."""
    ids = tokenizer(DEMO_MODEL_DIR).encode(PROMPT)
    params = {"presence_penalty": 1.5, "frequency_penalty": 0.7, "logit_bias": {"17": 2.5, "30": -100}}
    out = client.completions.create(
        model="pirate", prompt=ids, max_tokens=8, temperature=0, logprobs=0, echo=True, **params
    )
    generated: list[int] = []
    sequence = list(ids)
    for _ in range(8):
        logits = peft_logprobs(DEMO_MODEL_DIR, adapters["pirate"], sequence)[-1].clone()
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.numel()).float()
        logits -= 0.7 * counts + 1.5 * (counts > 0).float()
        logits[17] += 2.5
        logits[30] -= 100
        token = int(logits.argmax())
        generated.append(token)
        sequence.append(token)
    tok = tokenizer(DEMO_MODEL_DIR)
    assert out.choices[0].logprobs.tokens[len(ids) :] == [tok.decode([t]) for t in generated]
    # Keys must be ASCII token ids: "³" is a digit to str.isdigit but not to int() (found by fuzzing).
    for key in ("³", "x", "1.5"):
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="pirate", prompt="Hi", max_tokens=1, logit_bias={key: 1})
        assert refused.value.status_code in (400, 422) and "logit_bias" in refused.value.message, key


# ----- structured output --------------------------------------------------------------------------------------
def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_structured_output_per_row_in_one_batch(client, server):
    """Each concurrent request with its own schema or regex, adapter and sampling; every output validates."""
    regex = r"[a-c]{2}-[0-9]{3}"
    other = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }

    def run(i: int) -> tuple[str, str]:
        model = ("pirate", "support", "")[i % 3]
        sampling = {"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": i}
        kind = i % 4
        if kind == 0:
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"person {i}"}],
                max_tokens=120,
                response_format=_json_schema_format(SCHEMA),
                **sampling,
            )
            return "schema", r.choices[0].message.content
        if kind == 1:
            r = client.completions.create(
                model=model,
                prompt=f"flag {i}",
                max_tokens=60,
                extra_body={"response_format": _json_schema_format(other)},
                **sampling,
            )
            return "other", r.choices[0].text
        if kind == 2:
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"json {i}"}],
                max_tokens=200,
                response_format={"type": "json_object"},
                **sampling,
            )
            return "object", r.choices[0].message.content
        r = httpx.post(
            f"{server.url}/generate",
            json={
                "inputs": f"code {i}",
                "parameters": {
                    "adapter_id": model or None,
                    "max_new_tokens": 20,
                    "grammar": {"type": "regex", "value": regex},
                    **({"do_sample": True, "seed": i} if i % 2 == 0 else {}),
                },
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return "regex", r.json()["generated_text"]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, range(12)))
    for kind, text in results:
        if kind == "schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "other":
            jsonschema.validate(json.loads(text), other)
        elif kind == "object":
            assert isinstance(json.loads(text), dict), text
        else:
            assert re.fullmatch(regex, text), text


def test_a_schema_that_cannot_compile_is_a_422_that_says_why(client, server):
    with pytest.raises(openai.UnprocessableEntityError, match="regex"):
        client.completions.create(
            model="pirate", prompt=PROMPT, max_tokens=4, extra_body={"guided_regex": "a(b"}
        )
    r = httpx.post(
        f"{server.url}/generate",
        json={"inputs": PROMPT, "parameters": {"grammar": {"type": "json", "value": {"type": "nonsense"}}}},
    )
    assert r.status_code == 422 and "json schema" in r.json()["error"].lower(), r.text


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", model="pirate", temperature=0, max_tokens=80
    )
    person = llm.with_structured_output(Person, method="json_schema").invoke("Describe a pirate.")
    assert isinstance(person, Person)


# ----- models, tokenize, errors, CORS -------------------------------------------------------------------------
def test_models_by_id_tokenize_detokenize_and_openai_error_shape(client, server):
    assert client.models.retrieve("pirate").id == "pirate"
    assert client.models.retrieve("tiny").owned_by == "prefixserve"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("nope")
    tok = tokenizer(DEMO_MODEL_DIR)
    r = httpx.post(f"{server.url}/tokenize", json={"model": "pirate", "prompt": PROMPT}).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    messages = [{"role": "user", "content": PROMPT}]
    chat = httpx.post(f"{server.url}/tokenize", json={"model": "pirate", "messages": messages}).json()
    assert chat["tokens"] == list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    back = httpx.post(f"{server.url}/detokenize", json={"model": "pirate", "tokens": r["tokens"]}).json()
    assert back["prompt"] == PROMPT
    for path, body in (("/tokenize", {"model": "nope", "prompt": "x"}), ("/v1/nothing-here", {})):
        error = httpx.post(f"{server.url}{path}", json=body).json()["error"]
        assert set(error) >= {"message", "type", "code"}, error


def test_cors_only_for_the_configured_origin(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(
        f"{server.url}/v1/completions", headers={"Origin": "http://app.example.test", **preflight}
    )
    assert ok.headers.get("access-control-allow-origin") == "http://app.example.test"
    other = httpx.options(f"{server.url}/v1/completions", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in other.headers


# ----- TGI's and LoRAX's own clients --------------------------------------------------------------------------
def _run_clients_script(script: str, url: str) -> dict:
    assert CLIENTS_PYTHON.exists(), (
        f"{CLIENTS_PYTHON} is missing: run scripts/setup-dev.sh (the README's test set-up)"
    )
    done = subprocess.run(
        [str(CLIENTS_PYTHON), "-c", textwrap.dedent(script), url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tgi_client_unmodified(server):
    out = _run_clients_script(
        """
        import json, sys
        from text_generation import Client
        c = Client(sys.argv[1], timeout=60)
        r = c.generate("Once upon a time", max_new_tokens=8)
        d = c.generate("Once upon a time", max_new_tokens=4, decoder_input_details=True,
                       top_n_tokens=3)
        s = "".join(e.token.text for e in c.generate_stream("Once upon a time", max_new_tokens=8)
                    if not e.token.special)
        g = c.generate("x", max_new_tokens=12, grammar={"type": "regex", "value": "[0-9]{4}"})
        print(json.dumps({"text": r.generated_text, "stream": s, "prefill": len(d.details.prefill),
                          "first_logprob": d.details.prefill[0].logprob, "top": [len(t) for t in d.details.top_tokens],
                          "grammar": g.generated_text}))
        """,
        server.url,
    )
    whole = httpx.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}
    ).json()
    assert out["text"] == whole["generated_text"] == out["stream"]
    assert out["prefill"] == len(tokenizer(DEMO_MODEL_DIR).encode(PROMPT)) and out["first_logprob"] is None
    assert out["top"] == [3, 3, 3, 3] and re.fullmatch("[0-9]{4}", out["grammar"])


def test_lorax_client_unmodified(server):
    out = _run_clients_script(
        """
        import json, sys
        from lorax import Client
        c = Client(sys.argv[1], timeout=60)
        r = c.generate("Once upon a time", adapter_id="pirate", max_new_tokens=6, details=True,
                       return_k_alternatives=2, decoder_input_details=True)
        s = [e.token.text for e in c.generate_stream("Once upon a time", adapter_id="pirate", max_new_tokens=6)]
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"],
                  "additionalProperties": False}
        j = c.generate("data", adapter_id="support", max_new_tokens=40,
                       response_format={"type": "json_object", "schema": schema})
        e = c.generate("Once upon a time", adapter_id="pirate", max_new_tokens=3, ignore_eos_token=True)
        print(json.dumps({"text": r.generated_text, "prompt_tokens": r.details.prompt_tokens,
                          "alternatives": [len(t.alternative_tokens) for t in r.details.tokens],
                          "stream": "".join(s), "json": j.generated_text, "eos": e.generated_text}))
        """,
        server.url,
    )
    assert out["prompt_tokens"] == len(tokenizer(DEMO_MODEL_DIR).encode(PROMPT))
    assert out["alternatives"] == [2] * 6 and out["text"] == out["stream"]
    assert isinstance(json.loads(out["json"])["n"], int)


def test_huggingface_hub_client_details_and_grammar(server):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(model=server.url)
    out = hub.text_generation(
        PROMPT,
        max_new_tokens=4,
        details=True,
        decoder_input_details=True,
        top_n_tokens=2,
        adapter_id="pirate",
    )
    assert len(out.details.prefill) == len(tokenizer(DEMO_MODEL_DIR).encode(PROMPT))
    assert all(len(t) == 2 for t in out.details.top_tokens)
    constrained = hub.text_generation("x", max_new_tokens=10, grammar={"type": "regex", "value": "[a-z]{5}"})
    assert re.fullmatch("[a-z]{5}", constrained)
