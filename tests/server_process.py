"""Run `prefixserve serve` as a real process on loopback for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class ServerProcess:
    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefixserve",
                "serve",
                "--port",
                str(self.port),
                "--num-threads",
                "1",
                # PEFT, the oracle, runs in fp32; `auto` would pick bf16 on CPUs with native bf16
                *([] if "--dtype" in args else ["--dtype", "float32"]),
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
        )

    def wait_healthy(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@contextmanager
def running(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A healthy server for the `with` block (a module fixture yields from inside it)."""
    proc = ServerProcess(args, log_path, env)
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def keyed_demo_server(tmp: Path, key: str, *args: str):
    """`running` for the demo model with one API key (tenant `acme`), its store, keys and log under `tmp`."""
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": key, "tenant": "acme"}]}))
    return running(
        ["--adapter-dir", str(tmp / "store"), "--api-keys-file", str(keys), *args], tmp / "server.log"
    )


def tiny_model_server(model_dir: Path, tmp: Path, *args: str):
    """`running` for a tiny test model, its store and log under `tmp`."""
    store = ["--adapter-dir", str(tmp / "store"), "--max-total-tokens", "256"]
    return running(["--model", str(model_dir), *store, *args], tmp / "server.log")


def upload_files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (name, (adapter_dir / name).read_bytes(), "application/octet-stream"))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
