"""JSON logs carry the request id; a model without a chat template gets a clear 422 on chat."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from prefixserve.api.app import ServerState
from prefixserve.api.errors import APIError
from prefixserve.logging_setup import JsonFormatter


def test_json_log_lines():
    record = logging.LogRecord(
        "prefixserve.access", logging.INFO, __file__, 1, "POST %s -> %d", ("/generate", 200), None
    )
    record.request_id = "abc123"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /generate -> 200" and line["request_id"] == "abc123"
    assert line["level"] == "INFO" and line["time"].endswith("Z")


def test_chat_without_a_template_is_a_422():
    state = SimpleNamespace(
        loaded=SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None)), model_name="m"
    )
    with pytest.raises(APIError, match="has no chat template; use /v1/completions") as info:
        ServerState.encode_chat(state, [{"role": "user", "content": "hi"}])
    assert info.value.status == 422
