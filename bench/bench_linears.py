"""A step's linear layers three ways (issue 18, lever 3): torch's eager `nn.Linear`; prefixserve's
(`pack_linears`: q/k/v as one prepacked oneDNN GEMM, SiLU and the product in the MLP's GEMM epilogues, every
other linear prepacked); and `torch.compile` (inductor, with freezing, which prepacks the weights and fuses
the elementwise work around the GEMMs), compiled for each row count (`static`: fp32 GEMMs then run on MKL's
sgemm packed for exactly that many rows, which no engine step with a varying row count could use; at another
count MKL's packed op falls back to an unpacked product) and once for any (`dynamic`, what an engine would
run).

A Qwen2.5-0.5B shape (hidden 896, 14 query / 2 KV heads of 64, intermediate 4,864, biases on q/k/v), `--layers`
of them: each runs q/k/v, o on q (attention itself left out: this is about the linears), the SwiGLU MLP and
the residual adds, and returns its k and v (as a step stores them), so nothing can be optimized away. The
weights (~25 MB a layer in bf16) stream from memory as in a real step. Median ms per call, the three variants
interleaved; ratios to prefixserve's.

    python -m bench.bench_linears [--rows 1,16,64,512] [--dtypes bfloat16,float32] [--layers 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from bench.runtime import run_as_served
from prefixserve.engine.cpu.linears import pack_linears

CONFIG = Qwen2Config(
    hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, hidden_act="silu"
)


class Projections(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        head = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * head)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head)
        self.o_proj = nn.Linear(config.num_attention_heads * head, config.hidden_size, bias=False)


class LinearsOfALayer(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Projections(config)
        self.mlp = Qwen2MLP(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        h = x + attn.o_proj(q)
        return h + self.mlp(h), k, v


class LinearsOfAStep(nn.Module):
    def __init__(self, config: Qwen2Config, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LinearsOfALayer(config) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stored = []
        for layer in self.layers:
            x, k, v = layer(x)
            stored += [k, v]
        return x, stored


def median_ms(fn, x: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64,512")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the variants interleaved in each")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    run_as_served()
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # weights are constants: inductor prepacks them (oneDNN)
    torch._dynamo.config.recompile_limit = 64  # a graph per row count and dtype: never fall back to eager
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    results = []
    print(f"{'dtype':>9} {'rows':>5} {'eager':>7} {'ours':>7} {'static':>7} {'dynamic':>8}  ms; compile s")
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        torch.manual_seed(0)
        eager = LinearsOfAStep(CONFIG, args.layers).to(dtype).eval()
        ours = copy.deepcopy(eager)
        pack_linears(ours)
        dynamic = torch.compile(copy.deepcopy(eager), dynamic=True)
        for rows in [int(r) for r in args.rows.split(",")]:
            static = torch.compile(copy.deepcopy(eager), dynamic=False)
            x = torch.randn(rows, CONFIG.hidden_size, dtype=dtype)
            with torch.no_grad():
                compile_s = {}
                for name, fn in (("static", static), ("dynamic", dynamic)):
                    start = time.perf_counter()
                    fn(x)  # compiles (dynamic: the first time only)
                    compile_s[name] = time.perf_counter() - start
                reference = eager(x)[0].float()
                for name, fn in (("ours", ours), ("static", static), ("dynamic", dynamic)):
                    out = fn(x)[0].float()
                    err = (out - reference).abs().max().item() / reference.abs().max().item()
                    assert err < (0.05 if dtype == torch.bfloat16 else 1e-4), (name, err)
                variants = {"eager": eager, "ours": ours, "static": static, "dynamic": dynamic}
                for fn in variants.values():
                    fn(x)
                best = {name: float("inf") for name in variants}
                for _ in range(args.rounds):
                    for name, fn in variants.items():
                        best[name] = min(best[name], median_ms(fn, x, args.calls))
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": rows, "compile_s": compile_s}
            row |= {f"{name}_ms": ms for name, ms in best.items()}
            results.append(row)
            ratios = ", ".join(
                f"{name}/ours {best[name] / best['ours']:.2f}" for name in ("eager", "static", "dynamic")
            )
            print(
                f"{row['dtype']:>9} {rows:>5} {best['eager']:>7.2f} {best['ours']:>7.2f} {best['static']:>7.2f} "
                f"{best['dynamic']:>8.2f}  {compile_s['static']:.1f}/{compile_s['dynamic']:.1f}   {ratios}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}))


if __name__ == "__main__":
    main()
