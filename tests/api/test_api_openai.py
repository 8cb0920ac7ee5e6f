"""The OpenAI-compatible endpoints with the official `openai` client, and TGI streaming, over real HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from peft import CartridgeConfig, get_peft_model
from peft.tuners.cartridge.utils import compose_cartridge_adapters

from prefixserve.demo import DEMO_MODEL_DIR
from tests.server_process import ServerProcess, upload_files
from tests.tiny_models import load_base, make_adapter, peft_generate, tokenizer

pytestmark = pytest.mark.slow  # a server process for the module

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def demo_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-adapters")
    adapters = {
        "pirate": make_adapter(DEMO_MODEL_DIR, root / "pirate", 6, "random", seed=1),
        "support": make_adapter(DEMO_MODEL_DIR, root / "support", 4, "random", seed=2),
    }
    for name, t, seed in (("cart-a", 3, 3), ("cart-b", 5, 4)):
        torch.manual_seed(seed)
        model = get_peft_model(
            load_base(DEMO_MODEL_DIR), CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=t)
        )
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0.0, 1.0)
        model.save_pretrained(root / name)
        adapters[name] = root / name
    compose_cartridge_adapters([adapters["cart-a"], adapters["cart-b"]], output_path=root / "composed")
    adapters["composed"] = root / "composed"
    return adapters


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_adapters):
    tmp = tmp_path_factory.mktemp("openai")
    proc = ServerProcess(["--adapter-dir", str(tmp / "store")], tmp / "server.log")
    try:
        proc.wait_healthy()
        with httpx.Client(base_url=proc.url) as client:
            for name in ("pirate", "support", "cart-a", "cart-b"):
                assert (
                    client.put(f"/v1/adapters/{name}", files=upload_files(demo_adapters[name])).status_code
                    == 201
                )
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-in-anonymous-mode", max_retries=0)


def generate_tokens(server, inputs: str, adapter: str | None, n: int) -> dict:
    r = httpx.post(
        f"{server.url}/generate",
        json={"inputs": inputs, "parameters": {"adapter_id": adapter, "max_new_tokens": n, "details": True}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_equals_peft_and_counts_usage(client, server, demo_adapters):
    out = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=10, temperature=0)
    expected_ids = peft_generate(DEMO_MODEL_DIR, demo_adapters["pirate"], PROMPT, 10)
    assert out.choices[0].text == tokenizer(DEMO_MODEL_DIR).decode(expected_ids)
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(DEMO_MODEL_DIR).encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens,
        10,
        prompt_tokens + 10,
    )
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert base.choices[0].text == generate_tokens(server, PROMPT, None, 10)["generated_text"]
    assert base.choices[0].text != out.choices[0].text
    empty_model = client.completions.create(model="", prompt=PROMPT, max_tokens=10, temperature=0)
    assert empty_model.choices[0].text == base.choices[0].text


def test_streamed_completion_concatenates_to_the_same_text(client):
    whole = client.completions.create(model="support", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model="support",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_seeded_sampling_and_n(client):
    kwargs = dict(model="pirate", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text
    several = client.completions.create(**kwargs, n=3)
    assert len(several.choices) == 3 and several.choices[0].text == a.choices[0].text
    assert len({c.text for c in several.choices}) > 1


def test_chat_uses_the_template_and_streams(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    chat = client.chat.completions.create(model="pirate", messages=messages, max_tokens=8, temperature=0)
    rendered = tokenizer(DEMO_MODEL_DIR).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|assistant|>\n")
    assert chat.choices[0].message.content == generate_tokens(server, rendered, "pirate", 8)["generated_text"]
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="pirate", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny" and {"pirate", "support", "cart-a", "cart-b"} <= set(ids)


def test_unknown_model_and_unsupported_fields_are_clear_errors(client):
    with pytest.raises(openai.NotFoundError, match="adapter 'gpt-4' not found"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="tool calling is not supported"):
        client.chat.completions.create(
            model="pirate",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    zero = r"max_tokens must be between 1 and \d+, got 0 \(0 only with echo: true, to score the prompt\)"
    with pytest.raises(openai.UnprocessableEntityError, match=zero) as refused:
        client.completions.create(model="pirate", prompt=PROMPT, max_tokens=0)
    assert refused.value.param == "max_tokens"  # the field at fault, in OpenAI's error shape
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens must be between") as refused:
        client.completions.create(model="pirate", prompt=PROMPT, max_tokens=10**6)
    assert "max_new_tokens" not in str(refused.value)  # OpenAI's names on OpenAI's routes
    assert refused.value.param == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError, match="min_tokens must be between 0 and max_tokens"):
        client.completions.create(model="pirate", prompt=PROMPT, max_tokens=2, extra_body={"min_tokens": 3})


def test_composition_equals_peft_compose_cartridge_adapters(server, demo_adapters):
    composed = generate_tokens(server, PROMPT, "cart-a+cart-b", 10)
    tokens = [t["id"] for t in composed["details"]["tokens"]]
    assert tokens == peft_generate(DEMO_MODEL_DIR, demo_adapters["composed"], PROMPT, 10)
    base = generate_tokens(server, PROMPT, None, 10)
    assert [t["id"] for t in base["details"]["tokens"]] != tokens  # the prefix really steers the output
    r = httpx.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "cart-a+nope"}}
    )
    assert r.status_code == 404


def test_tgi_stream_events(server):
    whole = generate_tokens(server, PROMPT, "support", 9)
    events = []
    with httpx.stream(
        "POST",
        f"{server.url}/generate_stream",
        timeout=30,
        json={"inputs": PROMPT, "parameters": {"adapter_id": "support", "max_new_tokens": 9}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert (
        events[-1]["details"]["finish_reason"] == "length" and events[-1]["details"]["generated_tokens"] == 9
    )


def test_every_endpoint_is_in_the_openapi_schema(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    expected = {
        "/generate": "post",
        "/generate_stream": "post",
        "/v1/completions": "post",
        "/v1/chat/completions": "post",
        "/v1/models": "get",
        "/v1/models/{model_id}": "get",
        "/tokenize": "post",
        "/detokenize": "post",
        "/v1/adapters": "post",
        "/v1/adapters/{adapter_id}": "put",
        "/health": "get",
        "/ready": "get",
        "/info": "get",
        "/metrics": "get",
    }
    for path, method in expected.items():
        assert method in paths.get(path, {}), path
    put_body = paths["/v1/adapters/{adapter_id}"]["put"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(put_body)


def test_tgi_clients_neutral_fields_root_route_and_truncate(server):
    from huggingface_hub import InferenceClient

    neutral = {
        "best_of": None,
        "typical_p": None,
        "top_n_tokens": None,
        "watermark": False,
        "grammar": None,
        "frequency_penalty": None,
        "decoder_input_details": False,
        "truncate": None,
        "adapter_id": "pirate",
        "max_new_tokens": 6,
    }
    r = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": neutral})
    assert r.status_code == 200, r.text
    expected = generate_tokens(server, PROMPT, "pirate", 6)["generated_text"]
    assert r.json()["generated_text"] == expected
    # huggingface_hub's client posts to the root, as TGI serves it.
    client = InferenceClient(model=server.url)
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True, adapter_id="pirate")
    assert out.generated_text == expected and out.details.generated_tokens == 6
    streamed = "".join(client.text_generation(PROMPT, max_new_tokens=6, stream=True, adapter_id="pirate"))
    assert streamed == expected
    # truncate keeps the last tokens of the inputs.
    ids = tokenizer(DEMO_MODEL_DIR).encode(PROMPT)
    tail = tokenizer(DEMO_MODEL_DIR).decode(ids[-2:])
    truncated = httpx.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"truncate": 2, "max_new_tokens": 6}}
    )
    assert truncated.json()["generated_text"] == generate_tokens(server, tail, None, 6)["generated_text"]
    refused = httpx.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"adapter_source": "hub"}}
    )
    assert refused.status_code == 422 and "adapter_source" in refused.json()["error"]


def test_openai_token_prompts_n_limit_and_default_length(client, server):
    ids = tokenizer(DEMO_MODEL_DIR).encode(PROMPT)
    by_ids = client.completions.create(model="pirate", prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    with pytest.raises(openai.UnprocessableEntityError, match="prompt token ids must be in"):
        client.completions.create(model="pirate", prompt=[10**6], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="per tenant"):
        client.completions.create(model="pirate", prompt=[PROMPT] * 40, n=2, max_tokens=2)
    # No max_tokens and a prompt that leaves less room than the default: clamped, not refused.
    tok = tokenizer(DEMO_MODEL_DIR)

    def chat_len(text: str) -> int:
        messages = [{"role": "user", "content": text}]
        return len(
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )

    long_text = "word"
    while chat_len(long_text + " word") < 1000:  # leaves 24 positions of the demo model's 1024, default is 64
        long_text += " word"
    chat = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": long_text}], temperature=0
    )
    assert chat.usage.prompt_tokens == chat_len(long_text) and chat.usage.total_tokens == 1024
    assert chat.choices[0].finish_reason == "length"
