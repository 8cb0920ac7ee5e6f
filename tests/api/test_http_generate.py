"""End-to-end over real HTTP: upload PEFT adapters, then concurrent mixed-adapter requests equal PEFT."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server_process import tiny_model_server, upload_files
from tests.tiny_models import peft_generate

pytestmark = pytest.mark.slow  # a server process for the module

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
    with tiny_model_server(tiny_model_dirs["llama"], tmp_path_factory.mktemp("http")) as server:
        yield server


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


def test_a_header_that_disagrees_with_the_body_is_refused(llama_server, adapter_dirs):
    with httpx.Client(base_url=llama_server.url, timeout=60) as client:
        client.put("/v1/adapters/rand8", files=upload_files(adapter_dirs["llama"]["rand8"]))
        body = {"inputs": "Hello", "parameters": {"adapter_id": "rand8", "max_new_tokens": 2}}
        for route in ("/generate", "/generate_stream", "/"):
            r = client.post(route, json=body, headers={"X-Adapter-Id": "other"})
            assert r.status_code == 422, (route, r.text)
            assert "X-Adapter-Id header ('other') and parameters.adapter_id ('rand8')" in r.json()["error"]
        assert client.post("/generate", json=body, headers={"X-Adapter-Id": "rand8"}).status_code == 200


def test_hub_style_ids_get_a_422_that_says_why(llama_server, adapter_dirs):
    with httpx.Client(base_url=llama_server.url, timeout=60) as client:
        for method in ("PUT", "GET", "DELETE"):
            r = client.request(method, "/v1/adapters/acme/pirate")
            assert r.status_code == 422, (method, r.text)
            assert r.json()["error_type"] == "invalid_adapter_id"
            assert "'/' is not allowed" in r.json()["error"] and "'acme--pirate'" in r.json()["error"]
        r = client.put("/v1/adapters/acme%2Fpirate", files=upload_files(adapter_dirs["llama"]["rand8"]))
        assert r.status_code == 422 and "'/' is not allowed" in r.json()["error"]
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "acme/pirate"}})
        assert r.status_code == 422 and "'/' is not allowed" in r.json()["error"]
        r = client.post("/v1/completions", json={"model": "acme/pirate", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 422 and "'/' is not allowed" in r.json()["error"]["message"]
        assert client.get("/v1/adapters/").status_code != 422  # a trailing slash is not an id


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
