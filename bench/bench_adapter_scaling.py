"""Throughput as the number of distinct adapters grows (the S-LoRA question), in one run.

GPT-2 124M shape, random weights, 64 requests through a 16-row batch, prompt 32, 32 new tokens, greedy, T=20.
Each row of the sweep serves the same 64 requests spread over 1, 4, 16 or 64 distinct adapters; the last row
also gives the registry room for only 8 adapters, so most requests load theirs from the store.

    python bench/bench_adapter_scaling.py [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.bench_engine import VOCAB, bench_engine, build_adapters, build_model, make_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="best of, interleaved across the sweep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="prefixserve-scaling-"))
    model_dir = build_model(tmp / "model")
    adapters = build_adapters(model_dir, tmp / "adapters", 64, 20)
    prompts = torch.randint(0, VOCAB - 1, (args.requests, 32), generator=torch.Generator().manual_seed(0))
    engine = make_engine(model_dir, tmp / "store", adapters, args.rows, 20 + 32 + 32)
    bench_engine(engine, prompts[:2], 1, 4)  # warm-up
    tokens = args.requests * 32
    adapter_bytes = engine.loaded.kv_shape.token_width * 20 * 4
    roomy = engine.registry._cache
    tight = type(roomy)(maxsize=8 * adapter_bytes, getsizeof=lambda e: e.prefix.nbytes)
    sweep = [
        (1, "all", roomy),
        (4, "all", roomy),
        (16, "all", roomy),
        (64, "all", roomy),
        (64, "8 adapters", tight),
    ]
    best = [0.0] * len(sweep)
    for _ in range(args.repeats):  # interleaved: drift in machine load hits every row alike
        for i, (n, _, cache) in enumerate(sweep):
            engine.registry._cache = cache
            best[i] = max(best[i], tokens / bench_engine(engine, prompts, n, 32))
    print(f"{'distinct adapters':>18} {'registry room':>14} {'tokens/s':>9} {'vs 1 adapter':>13}")
    for (n, room, _), tps in zip(sweep, best, strict=True):
        print(f"{n:>18} {room:>14} {tps:>9.1f} {tps / best[0]:>13.2f}")


if __name__ == "__main__":
    main()
