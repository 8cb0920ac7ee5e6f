"""Request bodies are bounded as they stream in (chunked too), per route; keys are checked before any body;
texts are bounded and must be Unicode; stop sequences are bounded."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time

import httpx
import psutil
import pytest

from tests.server_process import keyed_demo_server, running

KEY = "body-limit-key-0123456789"
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    args = ["--adapter-dir", str(tmp / "store"), "--max-request-mb", "1", "--max-adapter-mb", "2"]
    with running(args, tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    with keyed_demo_server(tmp_path_factory.mktemp("limits-keyed"), KEY) as server:
        yield server


def _response(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP response (status and JSON body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed before a response: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(v for k, v in _headers(head) if k == "content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def _headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]


def send_chunked(
    url: str, path: str, total: int, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, dict, int]:
    """Send a chunked body of up to `total` bytes, stopping as soon as the server answers; returns the status,
    the error body and how many body bytes were sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{extra}\r\n".encode()
    )
    sent = 0
    chunk = f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n"
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(chunk)
            sent += CHUNK
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    try:
        status, body = _response(sock)
    finally:
        sock.close()
    return status, body, sent


@pytest.mark.slow
def test_a_chunked_body_is_refused_once_past_its_route_limit(server):
    process = psutil.Process(server.proc.pid)
    rss_before = process.memory_info().rss
    for method, path in (("POST", "/generate"), ("POST", "/v1/completions"), ("PUT", "/v1/adapters/x")):
        status, body, sent = send_chunked(server.url, path, 200 * 2**20, method=method)
        assert status == 413, body
        message = body["error"]["message"] if path.startswith("/v1/completions") else body["error"]
        assert (
            message
            == "request body exceeds this server's limit of 1.0 MB for this request (--max-request-mb)"
        )
        assert sent < 200 * 2**20  # refused while the body was still coming
    growth = process.memory_info().rss - rss_before
    assert growth < 64 * 2**20, f"server memory grew by {growth / 2**20:.0f} MB for three refused requests"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.slow
def test_declared_sizes_are_refused_before_reading(server):
    big = {"Content-Length": str(3 * 2**20), "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/generate", content=b"{" * (3 * 2**20), headers=big)
        assert r.status_code == 413 and "--max-request-mb" in r.json()["error"]
        # An adapter upload may be larger than a generation request, up to --max-adapter-mb.
        files = [
            ("files", ("adapter_model.safetensors", b"\0" * (3 * 2**20 // 2), "application/octet-stream"))
        ]
        r = c.put("/v1/adapters/x", files=files)
        assert r.status_code == 422 and "missing adapter_config.json" in r.json()["error"]
        files = [("files", ("adapter_model.safetensors", b"\0" * (3 * 2**20), "application/octet-stream"))]
        r = c.put("/v1/adapters/x", files=files)
        assert r.status_code == 413 and "limit of 2.0 MB for adapter uploads" in r.json()["error"]


@pytest.mark.slow
def test_texts_are_bounded_in_characters_before_tokenizing(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        info = c.get("/info").json()
        too_long = "a" * (900 * 1024)  # under the body limit, far above what max_input_tokens can hold
        r = c.post("/generate", json={"inputs": too_long})
        assert r.status_code == 422 and "inputs is 921600 characters" in r.json()["error"]
        r = c.post("/v1/completions", json={"prompt": ["hi", too_long]})
        assert r.status_code == 422 and "prompt.1 is 921600 characters" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": too_long}]})
        assert r.status_code == 422 and "characters" in r.json()["error"]["message"]
        r = c.put("/v1/adapters/t", json={"from_text": too_long})
        assert r.status_code == 422 and "from_text is 921600 characters" in r.json()["error"]
        assert info["max_input_tokens"] < 2000


@pytest.mark.slow
def test_keys_are_checked_before_the_body_is_read(keyed_server):
    # Headers only, a chunked body announced but never sent: the answer must not wait for it.
    for method, path in (("POST", "/generate"), ("PUT", "/v1/adapters/x"), ("POST", "/nowhere")):
        status, body, sent = send_chunked(keyed_server.url, path, 0, method=method)
        assert (status, sent) == (401, 0), body
    status, body, sent = send_chunked(keyed_server.url, "/generate", 0, {"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"] == "invalid API key"
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        r = c.post("/generate", content=b"x" * (100 * 2**20))  # declared and large: still a 401, not a 413
        assert r.status_code == 401
        ok = c.post(
            "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert ok.status_code == 200, ok.text
        assert c.get("/health").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_the_middleware_stops_reading_at_the_first_chunk_past_the_limit():
    from prefixserve.api.middleware import BodyLimitMiddleware

    reads = 0

    async def app(scope, receive, send):
        nonlocal reads
        while True:
            message = await receive()
            reads += 1
            if not message.get("more_body"):
                return

    async def receive():
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    middleware = BodyLimitMiddleware(app, lambda scope: (1000, "1000 bytes"))
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b""}
    asyncio.run(middleware(scope, receive, send))
    assert reads == 10  # the 11th chunk raised instead of reaching the app
    assert sent[0]["status"] == 413 and b"limit of 1000 bytes" in sent[1]["body"]


LONE = "abc\ud800def"  # json.dumps writes it as the escape "\\ud800", as an attacker's client would


@pytest.mark.slow
def test_lone_surrogates_are_a_422_naming_the_field(server):
    cases = [
        ("/generate", {"inputs": LONE}, "inputs"),
        ("/generate", {"inputs": "Hi", "parameters": {"stop": [LONE]}}, "parameters.stop.0"),
        ("/generate_stream", {"inputs": LONE}, "inputs"),
        ("/v1/completions", {"prompt": LONE}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", LONE]}, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "stop": LONE}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
            "messages.0.content",
        ),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path, body, field in cases:
            r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (path, body, r.text)
            error = r.json()["error"]
            message = error["message"] if isinstance(error, dict) else error
            assert field in message and "lone surrogate" in message, (path, message)
        r = c.put(
            "/v1/adapters/t",
            content=json.dumps({"from_text": LONE}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 422 and "body: Invalid JSON" in r.json()["error"], r.text  # pydantic's parser


@pytest.mark.slow
def test_stop_sequences_are_bounded(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        long_stop = "x" * 257
        r = c.post("/generate", json={"inputs": "Hi", "parameters": {"stop": [long_stop]}})
        assert r.status_code == 422 and "parameters.stop.0" in r.json()["error"], r.text
        r = c.post("/v1/completions", json={"prompt": "Hi", "stop": [long_stop]})
        assert r.status_code == 422 and "stop" in r.json()["error"]["message"], r.text
        r = c.post("/v1/completions", json={"prompt": "Hi", "stop": [f"s{i}" for i in range(65)]})
        assert r.status_code == 422 and "at most 64 items" in r.json()["error"]["message"], r.text
        r = c.post("/v1/completions", json={"prompt": "Hi", "stop": ["x" * 256] * 17})
        error = r.json()["error"]["message"]
        assert r.status_code == 422 and "stop" in error and "at most 4096" in error, r.text
        r = c.post("/generate", json={"inputs": "Hi", "parameters": {"stop": ["x" * 256] * 17}})
        assert r.status_code == 422 and "at most 4096" in r.json()["error"], r.text
        # lm-eval sends a task's stop strings and EOS besides: five and more are fine.
        for path, body in (
            ("/generate", {"inputs": "Hi", "parameters": {"stop": ["x" * 256] * 16, "max_new_tokens": 4}}),
            (
                "/v1/completions",
                {"prompt": "Hi", "stop": ["\n\n", ".", "!", "?", "<|endoftext|>"], "max_tokens": 4},
            ),
        ):
            ok = c.post(path, json=body)
            assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_a_decoded_newline_in_the_path_cannot_forge_a_log_line(server):
    httpx.get(f"{server.url}/x%0aFORGED%20GET%20/admin%20-%3E%20200%0d%1b")
    escaped = "GET /x\\x0aFORGED GET /admin -> 200\\x0d\\x1b -> 404"
    deadline = time.monotonic() + 30  # the access line is written just after the response is sent
    while escaped not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.log_path.read_text().splitlines()
    assert any(escaped in line for line in lines), lines[-3:]
    assert not any(line.startswith("FORGED") for line in lines)
