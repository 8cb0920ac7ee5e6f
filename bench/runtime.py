"""Benchmarks that run the engine in their own process run it as `prefixserve serve` would: with serve's
environment defaults (OpenMP spinning, huge pages for torch's large tensors) and tcmalloc preloaded where it is
installed. Without them an in-process figure measures another runtime than the server's (bench/RESULTS.md:
tcmalloc and huge pages are each worth a few percent of a step)."""

from __future__ import annotations

import os
import sys

from prefixserve.cli import RUNTIME_DEFAULTS
from prefixserve.startup import PRELOADED_MARK, TCMALLOC, tcmalloc_installed, with_tcmalloc


def run_as_served() -> None:
    """Restart this process (same command line) in serve's runtime, once; say which runtime it is."""
    if not os.environ.get(PRELOADED_MARK):
        env = {**RUNTIME_DEFAULTS, **os.environ}
        env = with_tcmalloc(env) if tcmalloc_installed() else {**env, PRELOADED_MARK: "1"}
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    malloc = "tcmalloc" if TCMALLOC in os.environ.get("LD_PRELOAD", "") else "the C library's malloc"
    print(
        f"runtime: {malloc}, " + ", ".join(f"{k}={os.environ.get(k)}" for k in RUNTIME_DEFAULTS), flush=True
    )
