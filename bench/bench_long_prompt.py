"""What a long prompt joining costs the rows already decoding: worst gap between their tokens, with the prompt
taken in at once vs in chunks (`--max-prefill-tokens`), measured side by side in one run.

GPT-2 124M shape, random weights; 8 rows decode (prompt 16, T=20 adapters) when a 900-token prompt joins.

    python -m bench.bench_long_prompt [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from bench.bench_engine import VOCAB, build_adapters, build_model, make_engine
from bench.runtime import run_as_served
from bench.scratch import scratch_dir
from prefixserve.engine.sequence import SamplingParams


def gaps_while_long_prompt_joins(
    engine, prompts: torch.Tensor, long_prompt: list[int]
) -> tuple[float, float]:
    """(worst gap, median gap) between tokens of the decoding rows, in ms, around the long prompt's prefill."""
    times: dict[int, list[float]] = {}
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.submit(
            prompt.tolist(),
            ("default", (f"a{i}",)),
            params,
            lambda e, i=i: times.setdefault(i, []).append(time.perf_counter()),
        )
    for _ in range(8):  # all rows decoding
        engine.step()
    engine.submit(long_prompt, None, replace(params, max_new_tokens=4), lambda e: None)
    while engine.scheduler.has_work():
        engine.step()
    gaps = [b - a for ts in times.values() for a, b in zip(ts, ts[1:], strict=False)]
    return max(gaps) * 1e3, statistics.median(gaps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--long", type=int, default=900)
    args = ap.parse_args()
    run_as_served()
    torch.set_num_threads(args.threads)
    tmp = scratch_dir("prefixserve-long-")
    model_dir = build_model(tmp / "model")
    adapters = build_adapters(model_dir, tmp / "adapters", args.rows, 20)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB - 1, (args.rows, 16), generator=gen)
    long_prompt = torch.randint(0, VOCAB - 1, (args.long,), generator=gen).tolist()
    print(f"{args.rows} rows decoding when a {args.long}-token prompt joins; gaps between their tokens:")
    print(f"{'max_prefill_tokens':>19} {'worst gap ms':>13} {'median gap ms':>14}")
    for budget in (4096, 256, 128):
        engine = make_engine(model_dir, tmp / f"store-{budget}", adapters, args.rows + 1, 1024)
        engine.scheduler.max_prefill_tokens = budget
        gaps_while_long_prompt_joins(engine, prompts[:2], long_prompt[:64])  # warm-up
        worst, median = gaps_while_long_prompt_joins(engine, prompts, long_prompt)
        print(f"{budget:>19} {worst:>13.1f} {median:>14.1f}")


if __name__ == "__main__":
    main()
