"""Engine throughput vs HF `generate` and PEFT, and adapter load latency, measured side by side in one run.

GPT-2 124M shape with random weights (speed does not depend on weight values), built locally;
a word-level tokenizer with GPT-2's vocabulary size stands in for GPT-2's (no network here).

    python bench/bench_engine.py [--threads 2] [--requests 16] [--prompt 32] [--new 32] [--virtual 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from datetime import date
from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bench.runtime import run_as_served
from bench.scratch import scratch_dir
from prefixserve.adapters.format import read_adapter_dir
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store_dir import DirectoryStore
from prefixserve.engine.cpu.kernels import native_kernels
from prefixserve.engine.cpu.threads import single_threaded
from prefixserve.engine.engine import LLMEngine
from prefixserve.engine.limits import EngineLimits
from prefixserve.engine.model_loader import load_model
from prefixserve.engine.sequence import SamplingParams
from prefixserve.engine.virtual_tokens import virtual_token_materializer

VOCAB = 50257


def build_model(out: Path) -> Path:
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1)
    ).save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{VOCAB - 1}").save_pretrained(out)
    return out


def build_adapters(model_dir: Path, out: Path, n: int, t: int) -> list[Path]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dirs = []
    for i in range(n):
        peft = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=t))
        with torch.no_grad():
            for p in peft.prompt_encoder.parameters():
                p.normal_(0, 0.5)
        peft.save_pretrained(out / f"a{i}")
        model = peft.unload() if hasattr(peft, "unload") else peft.get_base_model()
        dirs.append(out / f"a{i}")
    return dirs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_hf_generate(model, prompts: torch.Tensor, new: int) -> float:
    mask = torch.ones_like(prompts)
    with torch.inference_mode():
        return timed(
            lambda: model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=VOCAB - 1,
            )
        )


def bench_peft_one_at_a_time(model_dir: Path, adapters: list[Path], prompts: torch.Tensor, new: int) -> float:
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir).eval(), adapters[0], "a0"
    )
    for i, path in enumerate(adapters[1:], start=1):
        peft.load_adapter(path, f"a{i}")

    def run() -> None:
        for i, prompt in enumerate(prompts):
            peft.set_adapter(f"a{i % len(adapters)}")
            peft.generate(
                input_ids=prompt[None],
                attention_mask=torch.ones_like(prompt[None]),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=VOCAB - 1,
            )

    with torch.inference_mode():
        return timed(run)


def make_engine(
    model_dir: Path,
    store_dir: Path,
    adapters: list[Path],
    rows: int,
    length: int,
    attention: str = "auto",
    dtype: str = "float32",
) -> LLMEngine:
    loaded = load_model(str(model_dir), "cpu", dtype, length)
    registry = AdapterRegistry(
        DirectoryStore(store_dir),
        loaded.kv_shape,
        loaded.dtype,
        loaded.device,
        2**30,
        256,
        refresh_seconds=60,
        materialize=virtual_token_materializer(loaded.model),
        context_tokens=loaded.max_length,
    )
    for i, path in enumerate(adapters):
        registry.put("default", f"a{i}", read_adapter_dir(path))
    limits = EngineLimits(max_batch_size=rows, max_prefill_tokens=1 << 20)
    return LLMEngine(loaded, registry, limits, kernels=native_kernels(attention, loaded.device, loaded.dtype))


def bench_engine(
    engine: LLMEngine, prompts: torch.Tensor, n_adapters: int, new: int, submit_on_helper: bool = False
) -> float:
    """Seconds to serve `prompts` (request i on adapter i % n_adapters), every request queued at once, the
    prompt cache emptied first.
    Submitted on this thread before the first step, or with `submit_on_helper` from a helper thread while
    this one steps, as the server does (api/streams.py): then a submit that loads its adapter from the store
    overlaps the steps instead of preceding them."""
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    done = []
    # Callers time the same prompts again (repeats, sweeps): blocks cached by an earlier call would skip the
    # prefills this one means to count.
    engine.reset_prefix_cache().result()
    failures: list[BaseException] = []  # a helper thread's exception, raised again on this one

    def submit_all() -> None:
        try:
            for i, prompt in enumerate(prompts):
                engine.submit(prompt.tolist(), ("default", (f"a{i % n_adapters}",)), params, done.append)
        except BaseException as exc:
            failures.append(exc)

    def run() -> None:
        submitter = threading.Thread(target=single_threaded(submit_all)) if submit_on_helper else None
        if submitter is None:
            submit_all()
        else:
            submitter.start()
        while (submitter is not None and submitter.is_alive()) or engine.scheduler.has_work():
            if engine.scheduler.has_work():
                engine.step()
            else:
                time.sleep(0.0001)
        if submitter is not None:
            submitter.join()
        if failures:
            raise failures[0]

    with torch.inference_mode():
        seconds = timed(run)
    assert sum(1 for e in done if e.token_id >= 0) == len(prompts) * new
    return seconds


def bench_adapter_loads(engine: LLMEngine, n_adapters: int, loads: int) -> list[float]:
    registry = engine.registry
    times = []
    for i in range(loads):
        registry.invalidate("default", f"a{i % n_adapters}")
        start = time.perf_counter()
        registry.get("default", (f"a{i % n_adapters}",))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--virtual", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    run_as_served()
    torch.set_num_threads(args.threads)
    tmp = scratch_dir("prefixserve-bench-")
    model_dir = build_model(tmp / "model")
    adapters = build_adapters(model_dir, tmp / "adapters", args.requests, args.virtual)
    prompts = torch.randint(
        0, VOCAB - 1, (args.requests, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    engine = make_engine(
        model_dir, tmp / "store", adapters, args.requests, args.virtual + args.prompt + args.new
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = args.requests * args.new

    bench_engine(engine, prompts[:2], len(adapters), 4)  # warm-up
    bench_hf_generate(base, prompts[:2], 4)
    hf, eng = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        hf.append(tokens / bench_hf_generate(base, prompts, args.new))
        eng.append(tokens / bench_engine(engine, prompts, len(adapters), args.new))
    peft_tps = tokens / bench_peft_one_at_a_time(model_dir, adapters, prompts, args.new)
    loads = sorted(bench_adapter_loads(engine, len(adapters), 200))
    p50, p99 = statistics.median(loads) * 1e3, loads[int(0.99 * len(loads)) - 1] * 1e3

    hf_best, eng_best = max(hf), max(eng)
    rows = [
        (f"HF generate, base model, batch of {args.requests} (no adapters)", f"{hf_best:.1f}", "1.00"),
        (
            f"prefixserve engine, {args.requests} requests, {len(adapters)} different adapters (T={args.virtual})",
            f"{eng_best:.1f}",
            f"{eng_best / hf_best:.2f}",
        ),
        (
            "PEFT, one request at a time, set_adapter per request",
            f"{peft_tps:.1f}",
            f"{peft_tps / hf_best:.2f}",
        ),
    ]
    print(
        f"\n{date.today()}  {platform.processor() or platform.machine()}  threads={args.threads}  "
        f"torch {torch.__version__}  prompt={args.prompt} new={args.new} greedy fp32"
    )
    print(f"{'system':<72} {'tokens/s':>9} {'vs HF':>6}")
    for name, tps, ratio in rows:
        print(f"{name:<72} {tps:>9} {ratio:>6}")
    print(f"engine / PEFT one-at-a-time: {eng_best / peft_tps:.2f}x")
    print(f"all runs tokens/s: HF {[round(x, 1) for x in hf]}, engine {[round(x, 1) for x in eng]}")
    print(
        f"adapter load store->registry (T={args.virtual}, {loads and len(loads)} loads): p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"hf": hf, "engine": eng, "peft": peft_tps, "load_p50_ms": p50, "load_p99_ms": p99}, indent=2
            )
        )


if __name__ == "__main__":
    main()
