"""Fuzzing against the server's own OpenAPI schema (schemathesis): no 5xx, no response outside the schema.

Bounded (a fixed number of examples per operation, a fixed seed): about 40 s on two cores, most of it the
coverage phase (every schema boundary of every field, ~2,100 cases), which runs once; run with `-s` to
see the counts. Fuzzed three ways: a server without keys, a keyed server with a
valid key, and the keyed server without one (everything but the open routes must be a documented 401).
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from tests.server_process import keyed_demo_server, running

pytestmark = pytest.mark.slow  # server processes, minutes of fuzzing

KEY = "fuzz-key-0123456789abcdef"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
SEED = 20261123
LIMITS = ["--max-new-tokens", "16", "--default-max-new-tokens", "8", "--max-total-tokens", "256"]


@pytest.fixture(scope="module")
def anonymous_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with running(["--adapter-dir", str(tmp / "store"), *LIMITS], tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    with keyed_demo_server(tmp_path_factory.mktemp("fuzz-keyed"), KEY, *LIMITS) as server:
        yield server


def fuzz(url: str, examples: int, *extra: str, phases: str = "examples,fuzzing") -> int:
    """Run schemathesis; fail with its report on any finding. Returns how many cases it sent."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(examples),
            "--seed",
            str(SEED),
            "--phases",
            phases,
            "--generation-database",
            "none",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--no-color",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    cases = int(re.search(r"(\d+) generated", output).group(1))
    print(f"schemathesis {url} {' '.join(extra)}: {cases} cases, no failures")
    return cases


def test_fuzz_without_keys(anonymous_server):
    # The coverage phase (every schema boundary of every field) takes most of the time: once is enough.
    assert fuzz(anonymous_server.url, 25, phases="examples,coverage,fuzzing") > 500
    assert httpx.get(f"{anonymous_server.url}/health").status_code == 200


def test_fuzz_with_a_key(keyed_server):
    assert fuzz(keyed_server.url, 25, "-H", f"Authorization: Bearer {KEY}") > 250


def test_fuzz_without_a_key_on_a_keyed_server(keyed_server):
    assert fuzz(keyed_server.url, 5) > 50
