"""Scratch space for a benchmark run: its models, adapters and stores (1.6 GB for the vLLM comparison)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory, removed when the benchmark's process exits (it left them behind before)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
