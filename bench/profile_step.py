"""Where a decode step's time goes: the engine in-process (no HTTP), `--rows` rows decoding at once, each on its
own adapter, timed over `--steps` steps and then profiled with torch.profiler (ops by self CPU time).

    python -m bench.profile_step --shape qwen0.5b --dtype bfloat16 --rows 16 [--context 64] [--steps 20]

The shapes are bench_vs_vllm's (random weights, built locally). Rows are prefilled first (prompts of
`--context` tokens), so the timed steps are decode steps only.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_engine import VOCAB, build_adapters, make_engine
from bench.bench_vs_vllm import SHAPES
from bench.runtime import run_as_served
from bench.scratch import scratch_dir
from prefixserve.engine.sequence import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    run_as_served()
    torch.set_num_threads(args.threads)
    tmp = scratch_dir("prefixserve-profile-")
    model_dir = SHAPES[args.shape](tmp / "model")
    adapters = build_adapters(model_dir, tmp / "adapters", args.adapters, 20)
    engine = make_engine(model_dir, tmp / "store", adapters, args.rows, 2048, args.attention, args.dtype)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=args.steps + 16, ignore_eos=True)
    for i in range(args.rows):
        prompt = torch.randint(0, VOCAB - 1, (args.context,), generator=gen).tolist()
        engine.submit(prompt, ("default", (f"a{i % args.adapters}",)), params, lambda e: None)
    with torch.inference_mode():
        while (
            any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.running)
            or engine.scheduler.waiting
        ):
            engine.step()
        for _ in range(3):
            engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - start) / args.steps
        print(
            f"{args.shape} {args.dtype} {args.rows} rows, context ~{args.context}: {step * 1e3:.1f} ms/step, "
            f"{args.rows / step:.1f} tok/s (backend {engine.runner.backend.name})"
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
