"""Prompt-tuning and P-tuning adapters against prefix adapters of the same T, side by side in one run.

Every request on its own adapter; the figure is the ratio of engine throughputs, prompt kinds / prefix.
Also the load time per kind (store -> registry): prompt kinds add one forward pass over their T virtual tokens.
GPT-2 124M shape with random weights, as bench_engine.py builds it.

    python -m bench.bench_prompt_learning [--threads 2] [--requests 16] [--prompt 32] [--new 32] [--virtual 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from datetime import date
from pathlib import Path

import torch
from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from bench.bench_engine import (
    VOCAB,
    bench_adapter_loads,
    bench_engine,
    build_adapters,
    build_model,
    make_engine,
)
from bench.runtime import run_as_served
from bench.scratch import scratch_dir


def build_prompt_adapters(model_dir: Path, out: Path, n: int, t: int, method: str) -> list[Path]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dirs = []
    for i in range(n):
        if method == "prompt-tuning":
            config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=t)
        else:
            config = PromptEncoderConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=t, encoder_hidden_size=128
            )
        peft = get_peft_model(model, config)
        peft.save_pretrained(out / f"a{i}")
        model = peft.get_base_model()
        dirs.append(out / f"a{i}")
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    run_as_served()
    torch.set_num_threads(args.threads)
    tmp = scratch_dir("prefixserve-bench-")
    model_dir = build_model(tmp / "model")
    n, t = args.requests, args.virtual
    kinds = {
        "prefix-tuning": build_adapters(model_dir, tmp / "prefix", n, t),
        "prompt-tuning": build_prompt_adapters(model_dir, tmp / "prompt", n, t, "prompt-tuning"),
        "p-tuning": build_prompt_adapters(model_dir, tmp / "ptuning", n, t, "p-tuning"),
    }
    length = t + args.prompt + args.new
    engines = {
        kind: make_engine(model_dir, tmp / f"store-{kind}", dirs, n, length) for kind, dirs in kinds.items()
    }
    prompts = torch.randint(0, VOCAB - 1, (n, args.prompt), generator=torch.Generator().manual_seed(0))
    tokens = n * args.new
    for engine in engines.values():
        bench_engine(engine, prompts[:2], n, 4)  # warm-up (and every adapter loaded below)
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):  # interleaved, so drift hits every kind alike
        for kind, engine in engines.items():
            runs[kind].append(tokens / bench_engine(engine, prompts, n, args.new))
    loads = {kind: sorted(bench_adapter_loads(engine, n, 64)) for kind, engine in engines.items()}

    print(
        f"\n{date.today()}  {platform.processor() or platform.machine()}  threads={args.threads}  torch "
        f"{torch.__version__}  {n} requests, each on its own adapter, T={t}, prompt={args.prompt} "
        f"new={args.new} greedy fp32"
    )
    best_prefix = max(runs["prefix-tuning"])
    print(f"{'adapters':<16} {'tokens/s (best)':>16} {'vs prefix':>10} {'load p50 ms':>12}   all runs")
    for kind, values in runs.items():
        print(
            f"{kind:<16} {max(values):>16.1f} {max(values) / best_prefix:>10.2f} "
            f"{statistics.median(loads[kind]) * 1e3:>12.2f}   {[round(v, 1) for v in values]}"
        )


if __name__ == "__main__":
    main()
