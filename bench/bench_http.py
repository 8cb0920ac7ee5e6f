"""End-to-end over HTTP vs the engine called directly, in one run: what the API layer costs.

A `prefixserve serve` process with the GPT-2 124M shape (random weights) and 16 adapters (T=20); 16 concurrent
clients each POST /generate with their own adapter (prompt 32 tokens, 32 new, greedy). The same 16 requests
then run through an in-process engine. Both on 2 threads.

    python -m bench.bench_http
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from bench.bench_engine import VOCAB, bench_engine, build_adapters, build_model, make_engine
from tests.server_process import ServerProcess, upload_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prefixserve-http-"))
    model_dir = build_model(tmp / "model")
    adapters = build_adapters(model_dir, tmp / "adapters", args.requests, 20)
    prompts = torch.randint(0, VOCAB - 1, (args.requests, 32), generator=torch.Generator().manual_seed(0))
    texts = [" ".join(f"t{i}" for i in p.tolist()) for p in prompts]  # the word-level tokenizer's spelling
    tokens = args.requests * 32

    server = ServerProcess(
        [
            "--model",
            str(model_dir),
            "--adapter-dir",
            str(tmp / "store"),
            "--max-batch-size",
            str(args.requests),
            "--num-threads",
            str(args.threads),
        ],
        tmp / "server.log",
    ).wait_healthy(300)
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            for i, path in enumerate(adapters):
                client.put(f"/v1/adapters/a{i}", files=upload_files(path)).raise_for_status()

            def one(i: int) -> int:
                body = {
                    "inputs": texts[i],
                    "parameters": {"adapter_id": f"a{i}", "max_new_tokens": 32, "details": True},
                }
                r = client.post("/generate", json=body)
                r.raise_for_status()
                return r.json()["details"]["generated_tokens"]

            with ThreadPoolExecutor(args.requests) as pool:
                list(pool.map(one, range(2)))  # warm-up
                http = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    generated = sum(pool.map(one, range(args.requests)))
                    http.append(generated / (time.perf_counter() - start))
    finally:
        server.stop()

    torch.set_num_threads(args.threads)
    engine = make_engine(model_dir, tmp / "store2", adapters, args.requests, 20 + 32 + 32)
    bench_engine(engine, prompts[:2], len(adapters), 4)
    direct = max(tokens / bench_engine(engine, prompts, len(adapters), 32) for _ in range(args.repeats))
    print(f"engine called directly:          {direct:8.1f} tokens/s")
    print(
        f"over HTTP, {args.requests} concurrent clients: {max(http):8.1f} tokens/s  ({max(http) / direct:.2f}x direct)"
    )


if __name__ == "__main__":
    main()
