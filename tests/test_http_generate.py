"""End-to-end over real HTTP: upload PEFT adapters, then concurrent mixed-adapter requests equal PEFT."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server_process import ServerProcess, upload_files
from tests.tiny_models import peft_generate

REQUESTS = [
    ("rand3", "The quick brown fox"),
    ("rand8", "Hello"),
    (None, "Once upon a time there was a small robot"),
    ("proj4", "Thank you for contacting support."),
    ("trained6", "The quick brown fox"),
    ("zero5", "Hello"),
]


@pytest.fixture(scope="module")
def llama_server(tiny_model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    server = ServerProcess(
        [
            "--model",
            str(tiny_model_dirs["llama"]),
            "--adapter-dir",
            str(tmp / "store"),
            "--max-total-tokens",
            "256",
        ],
        tmp / "server.log",
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def test_upload_then_concurrent_mixed_requests_equal_peft(llama_server, tiny_model_dirs, adapter_dirs):
    adapters = adapter_dirs["llama"]
    with httpx.Client(base_url=llama_server.url, timeout=60) as client:
        for name, path in adapters.items():
            r = client.put(f"/v1/adapters/{name}", files=upload_files(path))
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["id"] == name and len(body["sha256"]) == 64 and body["size_bytes"] > 0
        r = client.put("/v1/adapters/rand3", files=upload_files(adapters["rand3"]))
        assert r.status_code == 200 and r.json()["num_virtual_tokens"] == 3

        def generate(item):
            name, prompt = item
            params = {"adapter_id": name, "max_new_tokens": 10, "details": True}
            return client.post("/generate", json={"inputs": prompt, "parameters": params})

        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            responses = list(pool.map(generate, REQUESTS))
    for (name, prompt), r in zip(REQUESTS, responses, strict=True):
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        tokens = [t["id"] for t in details["tokens"]]
        assert tokens == peft_generate(tiny_model_dirs["llama"], adapters[name] if name else None, prompt, 10)
        assert details["generated_tokens"] == len(tokens)
        assert details["finish_reason"] in ("length", "eos_token")
        assert "X-Request-Id" in r.headers


def test_header_selects_the_adapter(llama_server, tiny_model_dirs, adapter_dirs):
    adapters = adapter_dirs["llama"]
    with httpx.Client(base_url=llama_server.url, timeout=60) as client:
        client.put("/v1/adapters/rand8", files=upload_files(adapters["rand8"]))
        r = client.post(
            "/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 6, "details": True}},
            headers={"X-Adapter-Id": "rand8"},
        )
    assert [t["id"] for t in r.json()["details"]["tokens"]] == peft_generate(
        tiny_model_dirs["llama"], adapters["rand8"], "Hello", 6
    )


def test_errors_are_json_with_type(llama_server):
    with httpx.Client(base_url=llama_server.url, timeout=30) as client:
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "missing"}})
        assert r.status_code == 404 and r.json()["error_type"] == "adapter_not_found"
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"temperature": -1}})
        assert r.status_code == 422 and "parameters.temperature" in r.json()["error"]
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"best_of": 2}})
        assert r.status_code == 422 and "best_of" in r.json()["error"]
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "../etc"}})
        assert r.status_code == 422 and r.json()["error_type"] == "invalid_adapter_id"
        r = client.put(
            "/v1/adapters/bad", files=[("files", ("adapter_model.bin", b"x", "application/octet-stream"))]
        )
        assert r.status_code == 422 and "pickle" in r.json()["error"]
        assert client.get("/v1/adapters/bad").status_code == 404
