"""The command line as a new user meets it (issue 12): help that is quick to get and readable at 80 and
120 columns, one clear line (and a non-zero exit) for each way `serve` can fail to start, checked before
torch is imported and the model loaded; a cached hub model served when the hub is unreachable."""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from prefixserve import startup
from prefixserve.config import SECTIONS, Settings
from prefixserve.demo import DEMO_MODEL_DIR
from prefixserve.startup import bind_socket
from prefixserve.training.cli import train_command
from tests.paths import REPO_ROOT
from tests.server_process import ServerProcess, free_port

# Runs the real `prefixserve` command in a fresh interpreter and records, as it exits, whether torch was
# ever imported: help and start-up refusals must not pay torch's several-second import.
CLI = """
import os, sys
sys.argv = ["prefixserve", *sys.argv[1:]]
from prefixserve.cli import main
try:
    main()
finally:
    with open(os.environ["TORCH_MARK"], "w") as f:
        f.write(str("torch" in sys.modules))
"""


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None, columns: int = 80):
    mark = tmp_path / "torch-imported"
    full_env = {**os.environ, "COLUMNS": str(columns), "TORCH_MARK": str(mark), **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=full_env, timeout=120
    )
    return result, mark.read_text() == "True"


def test_serve_help_is_readable_complete_and_does_not_import_torch(tmp_path):
    for columns in (80, 120):
        result, torch_imported = run_cli(tmp_path, "serve", "--help", columns=columns)
        assert result.returncode == 0, result.stderr
        assert not torch_imported
        text = result.stdout
        assert "null" not in text and "{str" not in text and "{int" not in text
        assert max(len(line) for line in text.splitlines()) <= columns
        for name in Settings.model_fields:
            assert f"--{name.replace('_', '-')}" in text
            assert f"[PREFIXSERVE_{name.upper()}]" in " ".join(text.split())
        assert "Default: 128." in " ".join(text.split())  # --max-batch-size


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-batchsize", "8"], "unknown flag --max-batchsize (did you mean --max-batch-size?)"),
        (["--bogus"], "unknown flag --bogus"),
        (["--port"], "argument --port: expected one argument"),
    ],
)
def test_a_bad_serve_flag_is_one_line_in_the_help_s_words(tmp_path, args, expected):
    result, torch_imported = run_cli(tmp_path, "serve", *args)
    assert result.returncode == 2 and not torch_imported
    assert result.stderr.strip().splitlines() == [
        f"prefixserve serve: {expected}"
        + ("" if expected.endswith(";") else ";")
        + " `prefixserve serve --help` lists every setting"
    ]
    assert "usage:" not in result.stderr and "{str" not in result.stderr and "null" not in result.stderr


def test_every_setting_is_in_one_help_section():
    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(Settings.model_fields)


def test_train_help_shows_every_option_name_in_full_at_80_and_120_columns(tmp_path):
    flags = [f"--{name.replace('_', '-')}" for name in inspect.signature(train_command).parameters]
    for columns in (80, 120):
        result, torch_imported = run_cli(tmp_path, "train", "--help", columns=columns)
        assert result.returncode == 0, result.stderr
        assert not torch_imported
        assert "…" not in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= columns
        for flag in flags:
            assert re.search(rf"(^|\s){flag}(\s|$)", result.stdout, re.M), f"{flag} missing at {columns}"
        assert "--no-prefix-projection" in result.stdout


@pytest.fixture
def offline_hub(tmp_path):
    """An empty Hugging Face cache and a hub endpoint that refuses connections."""
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}


def _adapter_copy(tmp_path: Path) -> Path:
    target = tmp_path / "my-adapter"
    shutil.copytree(REPO_ROOT / "adapters" / "pirate", target)
    return target


@pytest.mark.parametrize(
    "model, expected",
    [
        (lambda tmp: str(tmp / "no" / "such" / "dir"), "no such directory"),
        (
            lambda tmp: str(_adapter_copy(tmp)),
            "is a PEFT adapter directory, not a base model: serve its base model (--model tiny) and upload "
            "the adapter with: curl -X PUT http://127.0.0.1:{port}/v1/adapters/my-adapter",
        ),
        (lambda tmp: str(REPO_ROOT / "README.md"), "is a file"),
        (lambda tmp: str(REPO_ROOT / "docs"), "has no config.json"),
        (lambda tmp: "bad..id", "neither a local directory nor a valid Hugging Face hub id"),
        (lambda tmp: "gpt2", "not in the local Hugging Face cache"),
    ],
    ids=["missing-dir", "adapter-dir", "file", "not-a-model-dir", "bad-hub-id", "hub-offline-uncached"],
)
def test_a_model_that_cannot_load_is_one_line_and_a_non_zero_exit(tmp_path, offline_hub, model, expected):
    port = free_port()
    result, torch_imported = run_cli(
        tmp_path, "serve", "--model", model(tmp_path), "--port", str(port), env=offline_hub
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert len(output.splitlines()) == 1, output
    assert output.startswith("prefixserve: --model ")
    assert expected.format(port=port) in output
    assert not torch_imported  # refused before the import (and the load) that took seconds


def test_hub_offline_message_says_why_and_where_the_cache_is(tmp_path, offline_hub):
    result, _ = run_cli(tmp_path, "serve", "--model", "gpt2", "--port", str(free_port()), env=offline_hub)
    assert f"{offline_hub['HF_ENDPOINT']} is unreachable" in result.stderr
    assert str(Path(offline_hub["HF_HOME"]) / "hub") in result.stderr


def test_a_busy_port_is_found_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, torch_imported = run_cli(tmp_path, "serve", "--port", str(port))
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert output.splitlines() == [
        f"prefixserve: port {port} on 127.0.0.1 is already in use (another prefixserve?): stop that "
        "process, or pass --port N (PREFIXSERVE_PORT) for another port"
    ]
    assert not torch_imported


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_to_the_bound_socket_send_without_waiting_for_acks(host):
    """uvicorn serves on the socket `bind_socket` made, through asyncio, which turns on TCP_NODELAY only for
    sockets that say IPPROTO_TCP. Without it, a response written as headers then body waited for the client's
    delayed ACK: 44 ms per request on a kept-alive connection, and as long before a stream's first token."""
    nodelay = []

    async def serve_one() -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = bind_socket(host, 0)
        server = await asyncio.start_server(accepted, sock=sock)  # what uvicorn does with `sockets=`
        async with server:
            _, writer = await asyncio.open_connection(host, sock.getsockname()[1])
            while not nodelay:
                await asyncio.sleep(0.01)
            writer.close()

    try:
        asyncio.run(asyncio.wait_for(serve_one(), 10))
    except OSError as exc:  # a machine without IPv6 on loopback
        if host == "::1" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return
        raise
    assert nodelay and nodelay[0] != 0


def _cache_as_hub_model(hf_home: Path, repo_id: str) -> None:
    """Put the demo model in a Hugging Face cache as `hf download` would have left it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(DEMO_MODEL_DIR, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_a_cached_hub_model_is_served_when_the_hub_is_unreachable(tmp_path, offline_hub):
    _cache_as_hub_model(Path(offline_hub["HF_HOME"]), "acme/tiny-cached")
    server = ServerProcess(
        ["--model", "acme/tiny-cached", "--adapter-dir", "store"],
        tmp_path / "server.log",
        env=offline_hub,
        cwd=tmp_path,
    )
    try:
        server.wait_healthy()
        log = server.log()
        assert "is unreachable" in log and "loading acme/tiny-cached from the local Hugging Face cache" in log
        # The store's absolute path is logged, and that a relative --adapter-dir depends on the directory.
        store = tmp_path.resolve() / "store"
        assert f"adapter store: {store} (--adapter-dir is relative to the current directory)" in log
        assert httpx.get(f"{server.url}/info").json()["model_id"] == "acme/tiny-cached"
    finally:
        server.stop()


class Restarted(Exception):
    """os.execve, stood in for: the process would be replaced here."""


@pytest.fixture
def execve(monkeypatch):
    calls = []

    def fake(path, argv, env):
        calls.append((path, argv, env))
        raise Restarted

    monkeypatch.setattr(os, "execve", fake)
    monkeypatch.delenv(startup.PRELOADED_MARK, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(sys, "argv", ["prefixserve", "serve", "--port", "8123"])
    return calls


def test_serve_restarts_itself_with_tcmalloc_where_it_is_installed(execve, monkeypatch):
    """auto and tcmalloc restart the same command with tcmalloc preloaded (after the socket is closed), once;
    system, or tcmalloc preloaded already, start as they are; tcmalloc asked for but missing is one line."""
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    sock = socket.socket()
    with pytest.raises(Restarted):
        startup.preload_tcmalloc("auto", sock)
    path, argv, env = execve[0]
    assert sock.fileno() == -1  # closed: the restarted process binds the port again
    assert argv == [sys.executable, "-m", "prefixserve", "serve", "--port", "8123"] and path == sys.executable
    assert env["LD_PRELOAD"] == f"{startup.TCMALLOC}:libother.so" and env[startup.PRELOADED_MARK] == "1"
    monkeypatch.setenv(startup.PRELOADED_MARK, "1")
    startup.preload_tcmalloc("tcmalloc", socket.socket())  # the restarted process goes on
    monkeypatch.delenv(startup.PRELOADED_MARK)
    startup.preload_tcmalloc("system", socket.socket())
    monkeypatch.setattr(startup, "tcmalloc_installed", lambda: False)
    startup.preload_tcmalloc("auto", socket.socket())  # not installed: the C library's malloc, logged
    with pytest.raises(startup.StartupError, match="apt-get install libtcmalloc-minimal4"):
        startup.preload_tcmalloc("tcmalloc", socket.socket())
    assert len(execve) == 1


def test_the_machines_that_run_the_suite_have_tcmalloc():
    """setup-dev.sh installs it: the servers the suite starts run on it, as the image's do."""
    assert startup.tcmalloc_installed(), "apt-get install libtcmalloc-minimal4 (scripts/setup-dev.sh)"
