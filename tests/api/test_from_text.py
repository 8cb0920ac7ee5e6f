"""Adapters from text: equal to the base model on text + prompt, and to PEFT's initialize_kv_prefix_from_text."""

from __future__ import annotations

import httpx
import pytest
from peft import PrefixTuningConfig, TaskType, get_peft_model
from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

from tests.server_process import ServerProcess
from tests.tiny_models import greedy_by_forward, load_base, tokenizer

pytestmark = pytest.mark.slow  # a server process per architecture

TEXT = "You are a pirate. Arr, matey! Hoist the sails and swab the deck."
PROMPT = " The captain said"
N = 10


def base_on_text_then_prompt(base, text_ids: list[int], prompt: str) -> list[int]:
    return greedy_by_forward(load_base(base), text_ids + tokenizer(base)(prompt)["input_ids"], N)


def peft_from_text(base, text: str, chat_template: bool):
    tok = tokenizer(base)
    n = len(
        tok.apply_chat_template([{"role": "system", "content": text}], tokenize=True, return_dict=False)
        if chat_template
        else tok(text)["input_ids"]
    )
    model = get_peft_model(
        load_base(base), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n)
    )
    embeddings = initialize_kv_prefix_from_text(model, tok, text=text, use_chat_template=chat_template)
    return embeddings, greedy_by_forward(model, tok(PROMPT)["input_ids"], N)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def server(request, tiny_model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"from-text-{request.param}")
    base = tiny_model_dirs[request.param]
    proc = ServerProcess(
        ["--model", str(base), "--adapter-dir", str(tmp / "store"), "--max-total-tokens", "256"],
        tmp / "server.log",
    )
    try:
        yield proc.wait_healthy(), base
    finally:
        proc.stop()


@pytest.mark.parametrize("chat_template", [False, True])
def test_from_text_equals_text_plus_prompt_and_peft(server, chat_template):
    proc, base = server
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        r = c.put("/v1/adapters/persona", json={"from_text": TEXT, "chat_template": chat_template})
        assert r.status_code in (200, 201), r.text
        gen = c.post(
            "/generate",
            json={
                "inputs": PROMPT,
                "parameters": {"adapter_id": "persona", "max_new_tokens": N, "details": True},
            },
        )
        served = [t["id"] for t in gen.json()["details"]["tokens"]]
    tok = tokenizer(base)
    text_ids = (
        tok.apply_chat_template([{"role": "system", "content": TEXT}], tokenize=True, return_dict=False)
        if chat_template
        else tok(TEXT)["input_ids"]
    )
    assert r.json()["num_virtual_tokens"] == len(text_ids)
    assert served == base_on_text_then_prompt(base, text_ids, PROMPT)
    _, peft_tokens = peft_from_text(base, TEXT, chat_template)
    assert served == peft_tokens


def test_from_text_errors(server):
    proc, _ = server
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        r = c.put("/v1/adapters/x", json={"from_text": ""})
        assert r.status_code == 422 and "must not be empty" in r.json()["error"]
        r = c.put("/v1/adapters/x", json={"from_text": "word " * 300})
        assert r.status_code == 422 and "--max-virtual-tokens" in r.json()["error"]
        r = c.put("/v1/adapters/x", json={"text": "oops"})
        assert r.status_code == 422 and "from_text" in r.json()["error"]
        r = c.put("/v1/adapters/x", content=b"hello", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        assert c.get("/v1/adapters/x").status_code == 404
