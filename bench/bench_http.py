"""What the API layer costs: the same closed-loop load through the engine called in-process, then over HTTP.

GPT-2 124M shape (random weights), 16 adapters (T=20), prompts of 32 token ids, 32 new tokens, greedy. Each of
`--concurrency` client threads sends its next request as soon as its last one finishes, both times; only the
path differs: `LLMEngine.submit` on a started engine in this process, or `POST /v1/completions` to a
`prefixserve serve` process on loopback (default settings, so its own torch threads).

    python -m bench.bench_http [--dtype bfloat16] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from bench.bench_engine import VOCAB, build_adapters, build_model
from bench.bench_vs_vllm import load, start_prefixserve
from bench.scratch import scratch_dir
from prefixserve.adapters.format import read_adapter_dir
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store_dir import DirectoryStore
from prefixserve.engine.cpu.kernels import native_kernels
from prefixserve.engine.engine import LLMEngine
from prefixserve.engine.limits import EngineLimits
from prefixserve.engine.model_loader import load_model
from prefixserve.engine.sequence import SamplingParams
from tests.server_process import upload_files


def direct(
    model: Path, adapters: list[Path], dtype: str, prompts: list[list[int]], concurrency: int
) -> float:
    loaded = load_model(str(model), "cpu", dtype, 1024)
    registry = AdapterRegistry(
        DirectoryStore(scratch_dir("prefixserve-http-store-")),
        loaded.kv_shape,
        loaded.dtype,
        loaded.device,
        2**29,
        256,
        2.0,
    )
    for i, path in enumerate(adapters):
        registry.put("default", f"a{i}", read_adapter_dir(path))
    kernels = native_kernels("auto", loaded.device, loaded.dtype)
    engine = LLMEngine(loaded, registry, EngineLimits(max_queue_size=1024), kernels=kernels)
    engine.start()
    params = SamplingParams(max_new_tokens=32)

    def one(i: int) -> int:
        done, tokens = threading.Event(), []

        def sink(event) -> None:
            if event.token_id >= 0:
                tokens.append(event.token_id)
            if event.finish_reason is not None:
                done.set()

        engine.submit(prompts[i], ("default", (f"a{i % len(adapters)}",)), params, sink)
        done.wait()
        return len(tokens)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(concurrency, 8))))  # warm-up
        start = time.perf_counter()
        tokens = sum(pool.map(one, range(len(prompts))))
        seconds = time.perf_counter() - start
    engine.stop_accepting()
    engine.join(10)
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = scratch_dir("prefixserve-http-")
    model = build_model(tmp / "model")
    adapters = build_adapters(model, tmp / "adapters", 16, 20)
    n = 4 * args.concurrency
    prompts = torch.randint(0, VOCAB - 1, (n, 32), generator=torch.Generator().manual_seed(0)).tolist()
    names = [f"a{i}" for i in range(len(adapters))]
    http, engine = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        engine.append(direct(model, adapters, args.dtype, prompts, args.concurrency))
        server = start_prefixserve(model, args.dtype, tmp)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for i, path in enumerate(adapters):
                    client.put(f"/v1/adapters/a{i}", files=upload_files(path)).raise_for_status()
            http.append(load(server.url, names, prompts, args.concurrency, {}))
        finally:
            server.stop()
    print(f"{args.dtype}, {args.concurrency} closed-loop clients, {n} requests")
    print(f"engine in-process: {max(engine):8.1f} tokens/s  (runs {[round(x, 1) for x in engine]})")
    print(f"over HTTP:         {max(http):8.1f} tokens/s  (runs {[round(x, 1) for x in http]})")
    print(f"HTTP / in-process: {max(http) / max(engine):.2f}")


if __name__ == "__main__":
    main()
