"""The prompt cache over real HTTP: cached_tokens in OpenAI's usage (official client), per-tenant isolation
with API keys, vLLM's metrics, the admin-only reset, cache_salt checks, and the switch that turns it off."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.api.test_api_adapters_tenants import KEYS, auth
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow  # server processes

SYSTEM = list(range(40, 80))  # 40 tokens: two full blocks of 16 and 8 more
QUESTIONS = [list(range(100, 106)), list(range(200, 209))]


def start(tmp, *args: str) -> ServerProcess:
    keys = tmp / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": KEYS["acme"], "tenant": "acme"},
                    {"key": KEYS["globex"], "tenant": "globex"},
                    {"key": KEYS["ops"], "tenant": "ops", "admin": True},
                ]
            }
        )
    )
    proc = ServerProcess(
        ["--adapter-dir", str(tmp / "store"), "--api-keys-file", str(keys), *args], tmp / "server.log"
    )
    return proc.wait_healthy()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start(tmp_path_factory.mktemp("prefix-cache"))
    try:
        yield proc
    finally:
        proc.stop()


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0)


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_a_repeated_system_prompt_is_cached_per_tenant_and_reported_in_usage(server):
    acme = client(server, "acme")
    first = acme.completions.create(model="", prompt=SYSTEM + QUESTIONS[0], max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hits = metric(server.url, "vllm:prefix_cache_hits_total")
    second = acme.completions.create(model="", prompt=SYSTEM + QUESTIONS[1], max_tokens=6, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == 32  # the system prompt's two full blocks
    assert metric(server.url, "vllm:prefix_cache_hits_total") == hits + 32
    assert metric(server.url, "prefixserve_prefix_cache_hits_tokens_total") >= 32
    assert metric(server.url, "vllm:prefix_cache_queries_total") >= 2 * len(SYSTEM)
    # Another tenant with the same prompt computes it: a hit would tell it what acme sent.
    globex = client(server, "globex")
    other = globex.completions.create(model="", prompt=SYSTEM + QUESTIONS[1], max_tokens=6, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].text == second.choices[0].text  # computed, or read from the cache: the same text

    # Chat, streamed, with usage at the end; and a salt that narrows sharing within a tenant.
    messages = [{"role": "system", "content": "You are terse. " * 8}, {"role": "user", "content": "Hi"}]
    for expected_cached in (0, 32):
        stream = acme.chat.completions.create(
            model="", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
        assert (usage.prompt_tokens_details.cached_tokens >= 32) == bool(expected_cached), usage
    salted = acme.chat.completions.create(
        model="", messages=messages, max_tokens=4, extra_body={"cache_salt": "u1"}
    )
    assert salted.usage.prompt_tokens_details.cached_tokens == 0

    # TGI's shape takes the salt too.
    body = {"inputs": "hello " * 40, "parameters": {"max_new_tokens": 2, "cache_salt": "s"}}
    assert httpx.post(f"{server.url}/generate", json=body, headers=auth("acme")).status_code == 200


def test_bad_cache_salts_are_refused_naming_the_field(server):
    for salt in ("x" * 257, 12, ""):
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 2, "cache_salt": salt},
            headers=auth("acme"),
        )
        assert r.status_code == 422 and "cache_salt" in r.text, r.text
        r = httpx.post(
            f"{server.url}/generate",
            json={"inputs": "hi", "parameters": {"cache_salt": salt}},
            headers=auth("acme"),
        )
        assert r.status_code == 422 and "cache_salt" in r.text, r.text


def test_only_an_admin_key_resets_the_cache(server):
    acme = client(server, "acme")
    acme.completions.create(model="", prompt=SYSTEM, max_tokens=2, temperature=0)
    assert acme.completions.create(
        model="", prompt=SYSTEM, max_tokens=2
    ).usage.prompt_tokens_details.cached_tokens
    assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 401
    refused = httpx.post(f"{server.url}/reset_prefix_cache", headers=auth("acme"))
    assert refused.status_code == 403 and "admin" in refused.json()["error"]
    reset = httpx.post(f"{server.url}/reset_prefix_cache", headers=auth("ops"))
    assert reset.status_code == 200 and reset.json()["cached_blocks"] > 0
    after = acme.completions.create(model="", prompt=SYSTEM, max_tokens=2, temperature=0)
    assert after.usage.prompt_tokens_details.cached_tokens == 0


def test_no_prefix_caching_turns_it_off(tmp_path):
    proc = start(tmp_path, "--no-prefix-caching")
    try:
        assert httpx.get(f"{proc.url}/info").json()["prefix_caching"] is False
        acme = client(proc, "acme")
        for _ in range(2):
            reply = acme.completions.create(model="", prompt=SYSTEM, max_tokens=2, temperature=0)
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        proc.stop()
