"""Fixtures shared by several layers, and the markers' automatic parts.

The suite is in layers, one folder each (each folder's conftest.py says what it tests and its own fixtures):
unit/ (pure parts: no model forward, no server), engine/ (the engine against PEFT on tiny local models, in
this process), training/ (`prefixserve train`), api/ (the app in this process or one server process on
loopback), system/ (several processes, external tools, the deployment files). Helpers every layer imports
stay here beside this file: tiny_models, engine_harness, server_process, s3_server, paths (REPO_ROOT).

Session fixtures here: tiny_model_dirs and adapter_dirs (tiny models of every architecture and PEFT adapters
of every kind for them: unit, engine, api), s3_server and s3_bucket (SeaweedFS on loopback: unit, system).

Markers (registered in pyproject.toml): `slow`, `external` and `cuda`. A test that uses s3_server, directly
or through another fixture, is marked `external` and `slow` here; one that reaches it through
request.getfixturevalue marks that parameter itself. arch_params() marks all architectures but the first
`slow` in the engine's sweeps. `cuda` tests are deselected (not skipped) where there is no CUDA device.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prefixserve.engine.cpu.kernels import load_kernels
from tests.s3_server import S3Server, S3ServerError, start_s3_server
from tests.tiny_models import build_model, make_adapter, make_prompt_adapter

torch.set_num_threads(int(os.environ.get("PREFIXSERVE_TEST_THREADS", "2")))
ARCHS = ("gpt2", "llama", "mistral", "qwen2")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the native attention kernel (engine/cpu/kernels.py) before any test: a first build takes ~25 s, which
    a server process started by a test would otherwise spend inside its start-up deadline. Cached: ~0.1 s. A
    build failure is not raised here: the kernel's own tests fail, saying why."""
    load_kernels()


def arch_params(*archs: str) -> list:
    """`archs` (every architecture by default) for @pytest.mark.parametrize("arch", ...): the first runs in
    the quick run, the others, the same check again on another architecture, are marked `slow`."""
    first, *others = archs or ARCHS
    return [first, *(pytest.param(arch, marks=pytest.mark.slow) for arch in others)]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def adapter_dirs(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict]:
    """Per architecture: adapters of every kind and several lengths."""
    root = tmp_path_factory.mktemp("adapters")
    out: dict[str, dict] = {}
    for arch, base in tiny_model_dirs.items():
        specs = {
            "rand3": (3, "random"),
            "rand8": (8, "random"),
            "zero5": (5, "zero"),
            "proj4": (4, "projection"),
            "trained6": (6, "trained"),
        }
        out[arch] = {
            name: make_adapter(base, root / arch / name, t, kind, seed=i)
            for i, (name, (t, kind)) in enumerate(specs.items())
        }
        out[arch].update(
            {
                name: make_prompt_adapter(base, root / arch / name, t, kind, seed=10 + i)
                for i, (name, (t, kind)) in enumerate(PROMPT_SPECS.items())
            }
        )
    return out


# Prompt-learning adapters in every architecture's set: prompt tuning (random, text, trained), P-tuning (MLP, LSTM).
PROMPT_SPECS = {
    "prompt4": (4, "prompt-random"),
    "prompttext6": (6, "prompt-text"),
    "prompttrained5": (5, "prompt-trained"),
    "pmlp3": (3, "p-mlp"),
    "plstm7": (7, "p-lstm"),
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """SeaweedFS's S3 gateway on loopback, for the whole session (tests make their own buckets). Missing or
    failing to start is a test failure, not a skip: the S3 store would go untested."""
    try:
        server: S3Server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    except S3ServerError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    """One bucket for the session's store tests; each test takes a prefix of its own."""
    return s3_server.new_bucket()


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the markers added here count in it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):  # SeaweedFS: started, ~2 s to stop
            item.add_marker(pytest.mark.external)
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
