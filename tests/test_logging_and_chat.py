"""JSON logs carry the request id; a model without a chat template gets a clear 422 on chat."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from prefixserve.api.app import ServerState
from prefixserve.api.auth import KeyFileError, KeyRing
from prefixserve.api.errors import APIError
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


def test_adapter_info_metric_redacts_names_when_there_are_tenants():
    from prefixserve.metrics import AdapterInfoCollector

    def labels(redact: bool) -> dict[str, str]:
        collector = AdapterInfoCollector(
            lambda: ["acme/support", "acme/support"], lambda: ["globex/faq"], 16, redact
        )
        return next(iter(collector.collect())).samples[0].labels

    plain = labels(redact=False)
    assert plain["running_adapters"] == "acme/support" and plain["waiting_adapters"] == "globex/faq"
    hidden = labels(redact=True)
    assert "acme" not in str(hidden) and "globex" not in str(hidden) and "support" not in str(hidden)
    assert len(hidden["running_adapters"]) == 12 and hidden["running_adapters"] != hidden["waiting_adapters"]
