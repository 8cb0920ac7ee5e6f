"""Throughput as the number of distinct adapters grows (the S-LoRA question), in one run.

GPT-2 124M shape (`--shape qwen0.5b`: bench_vs_vllm's Qwen2.5-0.5B shape), random weights, fp32 (`--dtype`),
prompt 32, greedy, T=20, 2 threads. Every point of the sweep serves the same
requests (request i on adapter i % n) through one engine with `--rows` rows, spread over 1, 16, 256 or 1,024
distinct adapters, all of them in the registry (memory) before the clock starts; the last point gives the
registry room for only `--tight` adapters, so most requests load theirs from the store (a directory on disk)
while others run. The prompt cache is emptied before each point (bench_engine does it: request i has the
same prompt at every point, and the same adapter at both 1,024 points).
Requests are submitted as the server submits them: from a helper thread while the engine
steps (`--submit engine`: all on the engine's thread first, every adapter load on the critical path).

    python -m bench.bench_adapter_scaling [--adapters 1,16,256,1024] [--rows 64] [--requests 1024] [--new 16]
                                          [--shape gpt2|qwen0.5b] [--dtype float32|bfloat16]

The 1,024 adapters are one PEFT adapter (`save_pretrained`) and copies of it with other random prefixes (the
same files, other values): building 1,024 through PEFT would take longer than the sweep.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.bench_engine import VOCAB, bench_engine, build_adapters, make_engine
from bench.bench_vs_vllm import SHAPES
from bench.runtime import run_as_served
from bench.scratch import scratch_dir
from prefixserve.adapters.format import read_adapter_dir


def clone_adapters(first: Path, out: Path, n: int) -> list[Path]:
    """`first` and n - 1 copies with other random prefix values."""
    weights = load_file(first / "adapter_model.safetensors")
    dirs = [first]
    gen = torch.Generator().manual_seed(1)
    for i in range(1, n):
        target = out / f"a{i}"
        shutil.copytree(first, target)
        save_file(
            {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in weights.items()},
            target / "adapter_model.safetensors",
        )
        dirs.append(target)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--adapters", default="1,16,256,1024", help="distinct adapters at each point")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--tight", type=int, default=64, help="registry room, in adapters, at the last point")
    ap.add_argument("--repeats", type=int, default=1, help="best of, interleaved across the sweep")
    ap.add_argument(
        "--submit",
        choices=["helper", "engine"],
        default="helper",
        help="submit (and so load adapters) on a helper thread while the engine steps, as the server does, "
        "or on the engine's thread before the first step (every load on the critical path)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "adapter_scaling.json")
    args = ap.parse_args()
    run_as_served()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.adapters.split(",")]
    tmp = scratch_dir("prefixserve-scaling-")
    model_dir = SHAPES[args.shape](tmp / "model")
    adapters = clone_adapters(
        build_adapters(model_dir, tmp / "adapters", 1, 20)[0], tmp / "adapters", max(counts)
    )
    prompts = torch.randint(0, VOCAB - 1, (args.requests, 32), generator=torch.Generator().manual_seed(0))
    engine = make_engine(
        model_dir, tmp / "store", adapters[:1], args.rows, 20 + 32 + args.new, dtype=args.dtype
    )
    for i, path in enumerate(adapters[1:], start=1):
        engine.registry.put("default", f"a{i}", read_adapter_dir(path))
    engine.scheduler.max_waiting = args.requests  # every request queued at once
    bench_engine(engine, prompts[:2], 1, 4)  # warm-up
    adapter_bytes = engine.loaded.kv_shape.token_width * 20 * engine.loaded.dtype.itemsize
    cache_type = type(engine.registry._cache)
    roomy = cache_type(maxsize=(max(counts) + 1) * adapter_bytes, getsizeof=lambda e: e.prefix.nbytes)
    tight = cache_type(maxsize=args.tight * adapter_bytes, getsizeof=lambda e: e.prefix.nbytes)
    engine.registry._cache = roomy
    for i in range(max(counts)):  # "room for all": every adapter in memory before the clock starts
        engine.registry.get("default", (f"a{i}",))
    sweep = [(n, "all", roomy) for n in counts] + [(max(counts), f"{args.tight} adapters", tight)]
    tokens = args.requests * args.new
    best = [0.0] * len(sweep)
    for _ in range(args.repeats):  # interleaved: drift in machine load hits every point alike
        for i, (n, _, cache) in enumerate(sweep):
            engine.registry._cache = cache
            best[i] = max(
                best[i], tokens / bench_engine(engine, prompts, n, args.new, args.submit == "helper")
            )
            print(f"  {n} adapters, registry room {sweep[i][1]}: {best[i]:.1f} tok/s", flush=True)
    print(f"{'distinct adapters':>18} {'registry room':>14} {'tokens/s':>9} {'vs 1 adapter':>13}")
    rows = []
    for (n, room, _), tps in zip(sweep, best, strict=True):
        print(f"{n:>18} {room:>14} {tps:>9.1f} {tps / best[0]:>13.2f}")
        rows.append({"adapters": n, "registry_room": room, "tokens_per_s": tps, "vs_one": tps / best[0]})
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "sweep": rows}, indent=2))


if __name__ == "__main__":
    main()
