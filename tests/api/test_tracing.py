"""OpenTelemetry tracing over real HTTP: a server with --otlp-traces-endpoint sends its spans (OTLP/HTTP,
protobuf) to a receiver on loopback that this test runs; a server without it loads no SDK and sends nothing."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from prefixserve.demo import DEMO_MODEL_DIR
from tests.server_process import running, upload_files
from tests.tiny_models import make_adapter

pytestmark = pytest.mark.slow  # a traced server process; a subprocess that builds the runtime

KEY = "sk-trace-test-0123456789"
ADAPTER = "pirate"
TRACE_ID = secrets.token_hex(16)
CALLER_SPAN_ID = secrets.token_hex(8)
PHASES = ("adapter_load", "queue", "prefill", "decode")


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: keeps every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.exports: list[tuple[str, str]] = []  # (path, content type) of each POST
        self.spans: list[tuple[dict, Span]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.exports.append((self.path, self.headers.get("Content-Type", "")))
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans += [(resource, span) for span in scope_spans.spans]
        body = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def attributes(key_values) -> dict:
    def value(v):
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [value(x) for x in v.array_value.values]
        return getattr(v, kind)

    return {kv.key: value(kv.value) for kv in key_values}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(DEMO_MODEL_DIR, tmp_path_factory.mktemp("adapter") / ADAPTER, 4, "random")


@pytest.fixture(scope="module")
def traced(receiver, adapter, tmp_path_factory):
    """One traced server: its requests' responses, the receiver holding their spans."""
    tmp = tmp_path_factory.mktemp("traced")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme"}]}))
    args = ["--adapter-dir", str(tmp / "store"), "--api-keys-file", str(keys)]
    args += ["--otlp-traces-endpoint", receiver.url]  # no path: the server adds /v1/traces
    # Batches wait 10 minutes: every span arrives with the flush at shutdown, which is tested so.
    env = {"OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        running(args, tmp / "server.log", env) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=60) as client,
    ):
        assert client.put(f"/v1/adapters/{ADAPTER}", files=upload_files(adapter)).status_code == 201
        body = {
            "inputs": "Hello",
            "parameters": {"adapter_id": ADAPTER, "max_new_tokens": 5, "details": True},
        }
        # Leave no span: a refused key, and a caller's trace that is not sampled (flags 00).
        bad_key = {"Authorization": "Bearer wrong", "X-Request-Id": "refused"}
        assert client.post("/generate", json=body, headers=bad_key).status_code == 401
        unsampled = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"}
        assert client.post("/generate", json=body, headers=unsampled).status_code == 200
        caller = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01", "X-Request-Id": "traced-generate"}
        generated = client.post("/generate", json=body, headers=caller)
        assert generated.status_code == 200, generated.text
        chat = {
            "model": ADAPTER,
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/chat/completions", json=chat) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        missing = {"inputs": "Hello", "parameters": {"adapter_id": "missing", "max_new_tokens": 2}}
        r = client.post("/generate", json=missing, headers={"X-Request-Id": "traced-404"})
        assert r.status_code == 404
        assert receiver.exports == []  # batched, not sent yet
    assert receiver.exports  # the server stopped (SIGTERM): its lifespan flushed the batch
    return {"generate": generated.json()["details"], "chat_usage": chunks[-1]["usage"]}


def request_span(receiver: Receiver, request_id: str) -> tuple[dict, Span]:
    with receiver.lock:
        found = [
            (r, s)
            for r, s in receiver.spans
            if s.kind == Span.SPAN_KIND_SERVER
            and attributes(s.attributes)["prefixserve.request_id"] == request_id
        ]
    assert len(found) == 1, f"{len(found)} request spans with id {request_id}"
    return found[0]


def children(receiver: Receiver, parent: Span) -> dict[str, Span]:
    with receiver.lock:
        spans = [s for _, s in receiver.spans if s.parent_span_id == parent.span_id]
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def assert_phases_nested_and_ordered(parent: Span, phases: dict[str, Span]) -> None:
    assert sorted(phases) == sorted(PHASES)
    for span in phases.values():
        assert span.trace_id == parent.trace_id
        assert parent.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= parent.end_time_unix_nano
    order = [phases[name] for name in PHASES]
    for before, after in zip(order, order[1:], strict=False):
        assert before.end_time_unix_nano <= after.start_time_unix_nano, (before.name, after.name)


def test_a_request_continues_the_callers_trace_with_its_phases(traced, receiver):
    resource, span = request_span(receiver, "traced-generate")
    assert resource["service.name"] == "prefixserve" and resource["deployment.environment"] == "test"
    assert span.name == "POST /generate"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CALLER_SPAN_ID
    assert span.status.code != Status.STATUS_CODE_ERROR
    details, attrs = traced["generate"], attributes(span.attributes)
    assert attrs["prefixserve.tenant"] == "acme"
    assert attrs["gen_ai.request.model"] == ADAPTER and attrs["prefixserve.adapter.ids"] == [ADAPTER]
    assert attrs["gen_ai.usage.input_tokens"] == details["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == details["generated_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == [details["finish_reason"]]
    assert attrs["http.route"] == "/generate" and attrs["http.response.status_code"] == 200
    phases = children(receiver, span)
    assert_phases_nested_and_ordered(span, phases)
    assert attributes(phases["adapter_load"].attributes)["prefixserve.adapter.ids"] == [ADAPTER]
    assert attributes(phases["prefill"].attributes)["gen_ai.usage.input_tokens"] == details["prompt_tokens"]
    assert attributes(phases["decode"].attributes)["gen_ai.usage.output_tokens"] == 5


def test_a_streamed_chat_gets_its_own_trace_with_the_usage_it_reported(traced, receiver):
    with receiver.lock:
        [span] = [s for _, s in receiver.spans if s.name == "POST /v1/chat/completions"]
    assert span.trace_id.hex() != TRACE_ID and not span.parent_span_id  # no traceparent: a new trace
    attrs, usage = attributes(span.attributes), traced["chat_usage"]
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == ADAPTER
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["prefixserve.tenant"] == "acme"
    assert_phases_nested_and_ordered(span, children(receiver, span))


def test_a_failed_request_has_an_error_span_without_engine_phases(traced, receiver):
    _, span = request_span(receiver, "traced-404")
    assert span.status.code == Status.STATUS_CODE_ERROR and "missing" in span.status.message
    attrs = attributes(span.attributes)
    assert attrs["error.type"] == "adapter_not_found" and attrs["http.response.status_code"] == 404
    assert children(receiver, span) == {}


def test_refused_and_unsampled_requests_leave_no_spans(traced, receiver):
    assert {path for path, _ in receiver.exports} == {"/v1/traces"}
    assert {kind for _, kind in receiver.exports} == {"application/x-protobuf"}
    with receiver.lock:
        names = sorted(s.name for _, s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER)
    # traced, 404 and chat; not the refused key's, not the unsampled trace's
    assert names == ["POST /generate", "POST /generate", "POST /v1/chat/completions"]


OFF_SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from prefixserve.api.app import create_app
from prefixserve.config import Settings
from prefixserve.runtime import build_runtime

runtime = build_runtime(Settings(adapter_dir=sys.argv[1], dtype="float32", num_threads=1))
with TestClient(create_app(runtime)) as client:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    traceparent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    r = client.post("/generate", json=body, headers={"traceparent": traceparent})
    assert r.status_code == 200, r.text
print(json.dumps(sorted(name for name in sys.modules if name.startswith("opentelemetry"))))
"""


def test_without_the_flag_no_sdk_is_loaded_and_nothing_is_sent(receiver, tmp_path):
    before = len(receiver.exports)
    # The standard exporter variable alone does not turn tracing on: only --otlp-traces-endpoint does.
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.url}/v1/traces",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", OFF_SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    assert not [m for m in modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))], modules
    assert len(receiver.exports) == before
