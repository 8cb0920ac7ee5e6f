"""Operating the server: disconnects free rows, 429 when full, SIGTERM drain, metrics, info."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.paths import REPO_ROOT
from tests.server_process import ServerProcess, upload_files
from tests.tiny_models import build_model, make_adapter

pytestmark = pytest.mark.slow  # server processes on a slow model

PROMPT = "Once upon a time"
LONG = 3000  # tokens: several seconds on the slow model, far longer than any test waits


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return build_model("gpt2-slow", tmp_path_factory.mktemp("slow") / "model")


def start_server(slow_model, tmp, *args: str) -> ServerProcess:
    return ServerProcess(
        [
            "--model",
            str(slow_model),
            "--adapter-dir",
            str(tmp / "store"),
            "--max-total-tokens",
            "4096",
            "--max-new-tokens",
            "4000",
            *args,
        ],
        tmp / "server.log",
    ).wait_healthy()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def long_stream(url: str, **params):
    """Open a streaming request and read its first event, so it surely holds a row (or waits for one)."""
    client = httpx.Client(timeout=30)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG, **params}}
    cm = client.stream("POST", f"{url}/generate_stream", json=body)
    response = cm.__enter__()
    return client, cm, response


@pytest.fixture(scope="module")
def one_row_server(slow_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-row")
    server = start_server(slow_model, tmp, "--max-batch-size", "1", "--max-queue-size", "1")
    try:
        yield server
    finally:
        server.stop()


def test_disconnects_free_the_row(one_row_server):
    url = one_row_server.url
    # Non-streaming: the client gives up after 1 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": LONG}}, timeout=1.0
        )
    assert wait_for(lambda: metric(url, "prefixserve_batch_current_size") == 0), "row not freed"
    # Streaming: read a few tokens, then hang up.
    client, cm, response = long_stream(url)
    lines = response.iter_lines()
    for _ in range(3):
        next(lines)
    assert metric(url, "prefixserve_batch_current_size") == 1
    cm.__exit__(None, None, None)
    client.close()
    assert wait_for(lambda: metric(url, "prefixserve_batch_current_size") == 0), "row not freed"
    assert metric(url, 'prefixserve_request_count_total{finish_reason="cancelled"}') >= 2


def test_full_queue_gets_429_with_retry_after(one_row_server):
    url = one_row_server.url
    opened = [long_stream(url)]  # takes the only row
    assert wait_for(lambda: metric(url, "prefixserve_batch_current_size") == 1)
    opened.append(long_stream(url))  # waits in the queue (size 1)
    try:
        assert wait_for(lambda: metric(url, "prefixserve_queue_size") == 1)
        r = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error_type"] == "overloaded" and "at capacity" in r.json()["error"]
    finally:
        for client, cm, _ in opened:
            cm.__exit__(None, None, None)
            client.close()
    assert wait_for(lambda: metric(url, "prefixserve_batch_current_size") == 0)
    r = httpx.post(
        f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}, timeout=30
    )
    assert r.status_code == 200


def test_per_tenant_limit(slow_model, tmp_path):
    server = start_server(slow_model, tmp_path, "--max-batch-size", "1", "--max-concurrent-per-tenant", "2")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    try:
        for round_ in range(2):  # the second round fails if any slot of the first leaked
            opened = [long_stream(server.url), long_stream(server.url)]
            assert all(r.status_code == 200 for _, _, r in opened), round_
            r = httpx.post(f"{server.url}/generate", json=body)
            assert r.status_code == 429 and "max-concurrent-per-tenant" in r.json()["error"]
            for client, cm, _ in opened:
                cm.__exit__(None, None, None)
                client.close()

            def short_request_succeeds() -> bool:
                return httpx.post(f"{server.url}/generate", json=body, timeout=30).status_code == 200

            assert wait_for(short_request_succeeds)
    finally:
        server.stop()


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "prefixserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b(?:prefixserve_\w+|vllm:\w+)", e)}


def gateway_samples(text: str) -> dict[str, Sample]:
    """The vLLM-named series, parsed as Prometheus text (each has exactly one sample)."""
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}
    assert all(len(f.samples) == 1 for f in families.values()), families
    return {name: f.samples[0] for name, f in families.items()}


def test_metrics_and_info(slow_model, tmp_path):
    server = start_server(slow_model, tmp_path)
    try:
        adapter = make_adapter(slow_model, tmp_path / "adapter", 4, "random")
        assert httpx.put(f"{server.url}/v1/adapters/steer", files=upload_files(adapter)).status_code == 201
        client, cm, response = long_stream(server.url, adapter_id="steer")
        lines = response.iter_lines()  # kept referenced: a collected iterator closes the stream
        first = next(lines)
        text = httpx.get(f"{server.url}/metrics").text
        assert response.status_code == 200, first
        assert re.search(r'prefixserve_adapter_requests_info\{.*running_adapters="default/steer"', text)
        # vLLM's names, which a Gateway API Inference Extension endpoint picker scrapes.
        gateway = gateway_samples(text)
        assert gateway["vllm:num_requests_running"].value == 1
        assert gateway["vllm:num_requests_waiting"].value == 0
        assert 0 < gateway["vllm:kv_cache_usage_perc"].value <= 1
        assert gateway["vllm:gpu_cache_usage_perc"].value == gateway["vllm:kv_cache_usage_perc"].value
        lora = gateway["vllm:lora_requests_info"]
        assert lora.labels["running_lora_adapters"] == "steer" and lora.labels["waiting_lora_adapters"] == ""
        max_batch_size = httpx.get(f"{server.url}/info").json()["max_batch_size"]
        assert lora.labels["max_lora"] == str(max_batch_size) and abs(lora.value - time.time()) < 120
        cm.__exit__(None, None, None)
        client.close()
        httpx.post(
            f"{server.url}/generate",
            json={"inputs": PROMPT, "parameters": {"adapter_id": "steer", "max_new_tokens": 3}},
        )
        text = httpx.get(f"{server.url}/metrics").text
        for name in (
            "prefixserve_request_count_total",
            "prefixserve_request_duration_seconds_bucket",
            "prefixserve_request_queue_duration_seconds_bucket",
            "prefixserve_time_to_first_token_seconds_bucket",
            "prefixserve_time_per_output_token_seconds_bucket",
            "prefixserve_prompt_tokens_total",
            "prefixserve_generated_tokens_total",
            "prefixserve_batch_current_size",
            "prefixserve_queue_size",
            "prefixserve_adapter_cache_hits_total",
            "prefixserve_adapter_cache_misses_total",
            "prefixserve_adapter_cache_evictions_total",
            "prefixserve_adapter_load_seconds_bucket",
        ):
            assert name in text, name
        assert metric(server.url, "prefixserve_adapter_cache_hits_total") >= 1
        families = list(text_string_to_metric_families(text))
        exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
        for name in dashboard_metrics():  # every series the Grafana dashboard queries is exported
            assert name in exported or re.sub(r"_(total|bucket)$", "", name) in exported, name
        idle = gateway_samples(httpx.get(f"{server.url}/metrics").text)
        assert idle["vllm:num_requests_running"].value == 0 and idle["vllm:kv_cache_usage_perc"].value == 0
        assert idle["vllm:lora_requests_info"].labels["running_lora_adapters"] == ""
        info = httpx.get(f"{server.url}/info").json()
        assert info["model_device_type"] == "cpu" and info["max_total_tokens"] == 4096 and info["version"]
        assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    finally:
        server.stop()


def test_sigterm_drains_running_requests_then_exits(slow_model, tmp_path):
    server = start_server(slow_model, tmp_path, "--drain-seconds", "60")
    result: dict = {}

    def run() -> None:
        r = httpx.post(
            f"{server.url}/generate",
            timeout=120,
            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "details": True}},
        )
        result["status"], result["body"] = r.status_code, r.json()

    worker = threading.Thread(target=run)
    try:
        worker.start()
        assert wait_for(lambda: metric(server.url, "prefixserve_batch_current_size") == 1)
        server.signal()
        assert wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, timeout=5)
        refused = httpx.post(
            f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        )
        assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"
        worker.join(60)
        assert result["status"] == 200 and result["body"]["details"]["generated_tokens"] == 400
        assert server.proc.wait(30) == 0
        assert "draining" in server.log()
    finally:
        worker.join(1)
        server.stop()
