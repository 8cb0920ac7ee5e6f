"""Prompt tuning and P-tuning over real HTTP: uploads of what PEFT writes, their kind on every surface, exact
generations in batches mixed with prefix adapters, and bad uploads refused with the store unchanged."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import save

from prefixserve.demo import DEMO_MODEL_DIR
from tests.api.test_api_operations import metric
from tests.server_process import ServerProcess, upload_files
from tests.tiny_models import make_adapter, make_prompt_adapter, peft_generate

pytestmark = pytest.mark.slow  # a server process for the module

PROMPTS = ["Once upon a time", "The weather today", "Dear customer, thank you"]
# id → (kind, virtual tokens); "prefix" is a prefix-tuning adapter beside them.
ADAPTERS = {
    "tuned": ("prompt-random", 5),
    "from-text": ("prompt-text", 6),
    "encoder-mlp": ("p-mlp", 4),
    "encoder-lstm": ("p-lstm", 7),
    "prefix": ("prefix", 3),
}
METHODS = {"tuned": "prompt-tuning", "from-text": "prompt-tuning", "encoder-mlp": "p-tuning"}
METHODS |= {"encoder-lstm": "p-tuning", "prefix": "prefix-tuning"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-learning")
    out = {}
    for i, (name, (kind, t)) in enumerate(ADAPTERS.items()):
        if kind == "prefix":
            out[name] = make_adapter(DEMO_MODEL_DIR, root / name, t, "random", seed=i)
        else:
            out[name] = make_prompt_adapter(DEMO_MODEL_DIR, root / name, t, kind, seed=i)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt-learning-server")
    proc = ServerProcess(["--adapter-dir", str(tmp / "store"), "--max-batch-size", "16"], tmp / "server.log")
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def generate(client: httpx.Client, adapter: str | None, prompt: str, n: int = 8) -> httpx.Response:
    parameters = {"max_new_tokens": n, "details": True, **({"adapter_id": adapter} if adapter else {})}
    return client.post("/generate", json={"inputs": prompt, "parameters": parameters})


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_uploads_surfaces_and_a_mixed_batch_equal_peft(server, adapters):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, path in adapters.items():
            created = c.put(f"/v1/adapters/{name}", files=upload_files(path))
            assert created.status_code == 201, created.text
            assert created.json()["method"] == METHODS[name]
            assert created.json()["num_virtual_tokens"] == ADAPTERS[name][1]
        for name in adapters:
            info = c.get(f"/v1/adapters/{name}").json()
            assert (info["method"], info["num_virtual_tokens"]) == (METHODS[name], ADAPTERS[name][1])
        listed = {a["id"]: a["method"] for a in c.get("/v1/adapters").json()["data"]}
        assert listed == METHODS
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        for name in adapters:
            assert cards[name]["method"] == METHODS[name]
            assert cards[name]["num_virtual_tokens"] == ADAPTERS[name][1]
            assert cards[name]["max_model_len"] == cards["tiny"]["max_model_len"] - ADAPTERS[name][1]
        one = c.get("/v1/models/encoder-lstm").json()
        assert one["method"] == "p-tuning" and one["num_virtual_tokens"] == 7

        # Every kind and the base model, each adapter on several prompts, all at once: one batch.
        plan = [(name, prompt) for name in [*adapters, None] for prompt in PROMPTS]
        with ThreadPoolExecutor(len(plan)) as pool:
            replies = list(pool.map(lambda job: generate(c, *job), plan))
        for (name, prompt), reply in zip(plan, replies, strict=True):
            expected = peft_generate(DEMO_MODEL_DIR, adapters[name] if name else None, prompt, 8)
            assert token_ids(reply) == expected, (name, prompt)

        completion = c.post(
            "/v1/completions",
            json={"model": "encoder-mlp", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0},
        )
        assert completion.status_code == 200, completion.text
        assert (
            completion.json()["choices"][0]["text"]
            == generate(c, "encoder-mlp", PROMPTS[0]).json()["generated_text"]
        )

        composed = generate(c, "tuned+encoder-mlp", PROMPTS[1])
        assert composed.status_code == 200, composed.text
        mixed = generate(c, "prefix+tuned", PROMPTS[1])
        assert mixed.status_code == 422
        assert "mixes prefix adapters with prompt-learning adapters (tuned)" in mixed.json()["error"]

        assert metric(server.url, 'prefixserve_adapters_loaded{method="p-tuning"}') == 2
        assert metric(server.url, 'prefixserve_adapter_cache_misses_total{method="prompt-tuning"}') >= 2


def _bad_uploads(good) -> dict[str, tuple[list, str]]:
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()
    t, hidden = config["num_virtual_tokens"], config["token_dim"]

    def pair(cfg: dict, w: bytes = weights) -> list:
        return [
            ("files", ("adapter_config.json", json.dumps(cfg).encode(), "application/json")),
            ("files", ("adapter_model.safetensors", w, "application/octet-stream")),
        ]

    return {
        "embedding width": (pair(config, save({"prompt_embeddings": torch.randn(t, hidden + 1)})), "width"),
        "rows": (
            pair(config, save({"prompt_embeddings": torch.randn(t + 1, hidden)})),
            "rows but num_virtual_tokens",
        ),
        "token_dim": (pair({**config, "token_dim": hidden * 2}), "token_dim is"),
        "encoder": (
            pair({**config, "encoder_reparameterization_type": "GRU"}),
            "encoder_reparameterization_type",
        ),
        "encoder size": (pair({**config, "encoder_num_layers": -1}), "encoder_num_layers must be a positive"),
        "no tokens": (pair({**config, "num_virtual_tokens": 0}), "num_virtual_tokens must be a positive"),
        "beyond the context": (
            pair(
                {**config, "num_virtual_tokens": 300}, save({"prompt_embeddings": torch.randn(300, hidden)})
            ),
            "above this server's limit",
        ),
        "lora": (pair({**config, "peft_type": "LORA"}), "peft_type is 'LORA'"),
        "multitask": (pair({**config, "peft_type": "MULTITASK_PROMPT_TUNING"}), "PROMPT_TUNING, P_TUNING"),
    }


def test_bad_prompt_learning_uploads_get_422_and_leave_the_store_unchanged(server, adapters):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        good = c.put("/v1/adapters/keeper", files=upload_files(adapters["encoder-mlp"])).json()
        before = c.get("/v1/adapters").json()
        for what, (files, message) in _bad_uploads(adapters["encoder-mlp"]).items():
            r = c.put("/v1/adapters/keeper", files=files)
            assert r.status_code == 422, (what, r.text)
            assert message in r.json()["error"], (what, r.json())
            assert c.put("/v1/adapters/brand-new", files=files).status_code == 422, what
        assert c.get("/v1/adapters").json() == before
        assert c.get("/v1/adapters/keeper").json()["sha256"] == good["sha256"]
        expected = peft_generate(DEMO_MODEL_DIR, adapters["encoder-mlp"], PROMPTS[2], 8)
        assert token_ids(generate(c, "keeper", PROMPTS[2])) == expected
