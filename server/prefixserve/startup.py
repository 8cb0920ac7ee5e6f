"""Checks that run before the model loads, so that a busy port or a wrong `--model` fails in a second with
one line saying what to do, instead of after a long load (or a minute of hub retries) with a traceback.

Nothing here imports torch or transformers: `prefixserve serve` calls these before importing them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from prefixserve.demo import DEMO_MODEL_NAME

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0  # how long the hub gets to answer before the model is taken from the local cache only
# The two files of a PEFT adapter directory (prefixserve.adapters.format names them too; that module needs torch).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_CHOICES = (
    "a local model directory (with config.json), a Hugging Face hub id such as gpt2, or tiny (the demo model)"
)


class StartupError(Exception):
    """The server cannot start as configured; the message says why and what to change."""


TCMALLOC = "libtcmalloc_minimal.so.4"
PRELOADED_MARK = "PREFIXSERVE_MALLOC_PRELOADED"  # set in the restarted process: it never restarts twice


def preload_tcmalloc(choice: str, sock: socket.socket) -> None:
    """Restart this process (the same pid, the same arguments) with tcmalloc preloaded, unless `choice` is
    "system", tcmalloc is preloaded already, or (with "auto") it is not installed; `sock`, the server's bound
    socket, is closed first (the new process binds it again). Torch allocates and frees a
    decode step's tensors and oneDNN's scratch space on every call; glibc's malloc took ~8 us of each of the
    ~120 GEMM calls of a Qwen2.5-0.5B-shaped step (bench/RESULTS.md). Call before importing torch."""
    if choice == "system" or PRELOADED_MARK in os.environ or TCMALLOC in os.environ.get("LD_PRELOAD", ""):
        return
    if not tcmalloc_installed():
        if choice == "tcmalloc":
            raise StartupError(
                f"--malloc tcmalloc: {TCMALLOC} is not installed (Debian/Ubuntu: apt-get install "
                "libtcmalloc-minimal4); or pass --malloc auto"
            )
        log.info("memory allocator: the C library's (install libtcmalloc-minimal4 for 3-6%% faster steps)")
        return
    sock.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "prefixserve", *sys.argv[1:]], with_tcmalloc(os.environ))


def with_tcmalloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with tcmalloc first in LD_PRELOAD, and marked so that the restarted process does not restart."""
    preload = ":".join(p for p in (TCMALLOC, env.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, PRELOADED_MARK: "1"}


def tcmalloc_installed() -> bool:
    """Whether the dynamic loader finds tcmalloc (asked of ldconfig's cache: loading an allocator into a
    running process would mix two mallocs)."""
    from ctypes.util import find_library

    return sys.platform.startswith("linux") and find_library("tcmalloc_minimal") == TCMALLOC


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (not yet listen) the server's address, as uvicorn would, before minutes go into loading a model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP. Without it, a
    # response written as headers then body waited for the client's delayed ACK: 44 ms per request on a
    # kept-alive connection (1.9 ms on a new one), and as much before a stream's first token.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another prefixserve?): stop that process, or pass "
                "--port N (PREFIXSERVE_PORT) for another port"
            ) from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"no permission to listen on port {port} (ports below 1024 need privileges): pass --port 8000"
            ) from None
        raise StartupError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port"
        ) from None
    return sock


def locate_model(model: str, server_url: str) -> str:
    """What `--model` names: the demo model, a local model directory, or a hub id (cached, or the hub reachable).

    Returns `model` unchanged; raises StartupError with one line for each way it can be wrong. When the hub
    cannot be reached, turns on the hub's offline mode so that a cached model loads without retries.
    """
    if model == DEMO_MODEL_NAME:
        return model
    path = Path(model).expanduser()
    if path.exists():
        check_model_dir(path, model, server_url)
        return model
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        raise StartupError(f"--model {model}: no such directory. Pass {MODEL_CHOICES}")
    return _locate_on_hub(model)


def check_model_dir(path: Path, model: str, server_url: str) -> None:
    if not path.is_dir():
        raise StartupError(
            f"--model {model} is a file; pass the directory that holds config.json and the weights"
        )
    if (path / "config.json").is_file():
        return
    if (path / ADAPTER_FILES[0]).is_file():
        raise StartupError(_adapter_dir_message(path, model, server_url))
    raise StartupError(
        f"--model {model} has no config.json, so it is not a Hugging Face model directory "
        "(model.save_pretrained(dir) writes one). Pass " + MODEL_CHOICES
    )


def _adapter_dir_message(path: Path, model: str, server_url: str) -> str:
    try:
        base = json.loads((path / ADAPTER_FILES[0]).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    serve = f"serve its base model (--model {base})" if base else "serve its base model with --model"
    adapter_id = path.resolve().name
    files = " ".join(f"-F files=@{path / name}" for name in ADAPTER_FILES)
    return (
        f"--model {model} is a PEFT adapter directory, not a base model: {serve} and upload the adapter "
        f"with: curl -X PUT {server_url}/v1/adapters/{adapter_id} {files}"
    )


def check_adapter_store(location: object) -> None:
    """An S3 bucket that is missing, unreachable or closed to these credentials fails start-up here, before
    the model loads; a directory is created when the store opens."""
    from prefixserve.adapters.locations import S3Location

    if not isinstance(location, S3Location):
        return
    from prefixserve.adapters.errors import StoreError
    from prefixserve.adapters.s3_client import check_bucket, make_client

    try:
        check_bucket(make_client(), location)
    except StoreError as exc:
        raise StartupError(str(exc)) from None


def _locate_on_hub(model: str) -> str:
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except HFValidationError:
        raise StartupError(
            f"--model {model!r} is neither a local directory nor a valid Hugging Face hub id. Pass {MODEL_CHOICES}"
        ) from None
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = hub_unreachable(constants.ENDPOINT)
        if reason is None:
            return model  # transformers downloads it, or checks the cached copy for updates
    if not cached:
        raise StartupError(
            f"--model {model}: not a local directory, and as a hub id it is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) while the hub cannot be used ({reason}). Download it where the hub is "
            f"reachable (hf download {model}, then copy the cache), or pass a local model directory"
        )
    if not constants.HF_HUB_OFFLINE:
        log.warning("%s: loading %s from the local Hugging Face cache only", reason, model)
        go_offline()
    return model


def hub_unreachable(endpoint: str) -> str | None:
    """None when the hub answers (any HTTP status) within HUB_PROBE_SECONDS; else why not, in a few words."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_SECONDS)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        return f"{endpoint} is unreachable: {getattr(why, 'strerror', None) or why}"
    return None


def go_offline() -> None:
    """The hub's offline mode, for this process: read from the environment at import, and at run time."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
