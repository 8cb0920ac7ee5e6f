"""JSON logs carry the request id; a model without a chat template gets a clear 422 on chat."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest

from prefixserve.api.auth import KeyFileError, KeyRing
from prefixserve.api.errors import APIError
from prefixserve.api.state import ServerState
from prefixserve.logging_setup import JsonFormatter, PlainFormatter


def test_json_log_lines():
    record = logging.LogRecord(
        "prefixserve.access", logging.INFO, __file__, 1, "POST %s -> %d", ("/generate", 200), None
    )
    record.request_id = "abc123"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /generate -> 200" and line["request_id"] == "abc123"
    assert line["level"] == "INFO" and line["time"].endswith("Z")


def test_plain_log_lines_escape_control_characters():
    record = logging.LogRecord(
        "prefixserve.access",
        logging.INFO,
        __file__,
        1,
        "GET %s -> %d",
        ("/x\nFORGED 200\r\x1b[31m\ud800", 404),
        None,
    )
    line = PlainFormatter("%(levelname)s %(message)s").format(record)
    assert line == "INFO GET /x\\x0aFORGED 200\\x0d\\x1b[31m\\ud800 -> 404"
    assert "\n" not in line


def test_chat_without_a_template_is_a_422():
    state = SimpleNamespace(
        loaded=SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None)), model_name="m"
    )
    with pytest.raises(APIError, match="has no chat template; use /v1/completions") as info:
        ServerState.encode_chat(state, [{"role": "user", "content": "hi"}])
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"key": "k" * 20, "tenant": "acme", "admin": "false"}, "'admin' must be true or false"),
        ({"key": "k" * 20}, "'tenant' must be a string"),
        ({"key": "short", "tenant": "acme"}, "at least 16 characters"),
        ({"key_sha256": "abc", "tenant": "acme"}, "64 hex characters"),
        ({"key": "k" * 20, "tenant": "../x"}, "invalid tenant"),
    ],
)
def test_keys_file_is_validated(tmp_path, entry, message):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(KeyFileError, match=message):
        KeyRing.from_file(path)


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps({"keys": [{"key": "k" * 20, "tenant": "a"}, {"key": "k" * 20, "tenant": "b"}]})
    )
    with pytest.raises(KeyFileError, match="listed twice"):
        KeyRing.from_file(path)


def _families(names: str) -> dict[str, dict[str, str]]:
    from prefixserve.metrics_live import AdapterInfoCollector, EngineView, GatewayCollector

    view = EngineView(
        num_running=lambda: 2,
        num_waiting=lambda: 1,
        kv_cache_usage=lambda: 0.25,
        running_adapters=lambda: [("acme", "support"), ("acme", "support"), ("acme", "a+b")],
        waiting_adapters=lambda: [("globex", "faq")],
        max_adapters=16,
        model_name="tiny",
    )
    out = {}
    for collector in (AdapterInfoCollector(view, names), GatewayCollector(view, names)):
        for family in collector.collect():
            out[family.name] = {**family.samples[0].labels, "value": family.samples[0].value}
    return out


def test_adapter_metrics_name_adapters_as_requests_do_or_hide_them():
    plain = _families("plain")
    info = plain["prefixserve_adapter_requests_info"]
    assert info["running_adapters"] == "acme/a+b,acme/support" and info["waiting_adapters"] == "globex/faq"
    lora = plain["vllm:lora_requests_info"]  # what a request's `model` says: no tenant
    assert (lora["running_lora_adapters"], lora["waiting_lora_adapters"], lora["max_lora"]) == (
        "a+b,support",
        "faq",
        "16",
    )
    assert abs(lora["value"] - time.time()) < 60  # when the set last changed, as a Unix time
    assert plain["vllm:num_requests_running"] == {"model_name": "tiny", "value": 2}
    assert plain["vllm:num_requests_waiting"]["value"] == 1
    assert plain["vllm:kv_cache_usage_perc"]["value"] == plain["vllm:gpu_cache_usage_perc"]["value"] == 0.25
    hidden = _families("digest")
    shown = str(hidden["prefixserve_adapter_requests_info"]) + str(hidden["vllm:lora_requests_info"])
    assert not any(word in shown for word in ("acme", "globex", "support", "faq"))
    running = hidden["vllm:lora_requests_info"]["running_lora_adapters"].split(",")
    assert len(running) == 2 and all(len(d) == 12 for d in running)
