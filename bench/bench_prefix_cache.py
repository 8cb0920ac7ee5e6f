"""The prompt cache, side by side with vLLM's (its automatic prefix caching, on by default in v1).

GPT-2 124M shape with random weights, prompts as token ids, greedy, OpenAI `/v1/completions` streamed (TTFT is
the time to the first streamed token), the same client and requests for both servers, one server at a time:

- repeat: one adapter, a 700-token system prompt; a first request, then one with another 40-token question.
  The second's TTFT over the first's, with the cache on and (prefixserve) off.
- system prompts: 8 adapters, each with its own 800-token system prompt (GPT-2 has 1,024 positions) (vLLM: 8 system prompts on the base
  model), 64 requests with distinct 50-token questions, 64 new tokens, 16 at a time.
- chat: 8 conversations of 4 turns at once; each turn resends the history (a 200-token system prompt, then
  per turn a 50-token user message and the 64-token reply) and asks for 64 new tokens.

    bash bench/setup_vllm.sh && python -m bench.bench_prefix_cache [--servers prefixserve,no-cache,vllm] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.bench_engine import VOCAB, build_adapters, build_model
from bench.bench_vs_vllm import HERE, Server, start_vllm
from bench.scratch import scratch_dir
from tests.server_process import free_port, upload_files

ADAPTERS, VIRTUAL = 8, 20


def ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(VOCAB - 1) for _ in range(n)]


def start_prefixserve(model: Path, dtype: str, tmp: Path, *flags: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "prefixserve", "serve", "--model", str(model), "--dtype", dtype]
    argv += [
        "--port",
        str(port),
        "--adapter-dir",
        str(tmp / f"store{len(flags)}"),
        "--max-total-tokens",
        "2048",
    ]
    argv += ["--max-input-tokens", "2000", "--max-queue-size", "1024", "--max-concurrent-per-tenant", "1024"]
    return Server([*argv, *flags], {}, port, tmp / f"prefixserve{len(flags)}.log").wait(300)


def stream_one(
    client: httpx.Client, url: str, model: str, prompt: list[int], new: int, extra: dict
) -> tuple[float, int]:
    """(seconds to the first token, tokens generated) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, **extra}
    body["stream_options"] = {"include_usage": True}
    start, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert first is not None
    return first, tokens


def repeat_case(url: str, model: str, extra: dict) -> dict:
    rng = random.Random(0)
    system = ids(700, rng)
    with httpx.Client(timeout=600) as client:
        stream_one(client, url, model, ids(40, rng), 4, extra)  # warm-up, another prompt
        first, _ = stream_one(client, url, model, system + ids(40, rng), 4, extra)
        second, _ = stream_one(client, url, model, system + ids(40, rng), 4, extra)
    return {"first_ttft_s": first, "second_ttft_s": second, "speedup": first / second}


def run_load(url: str, jobs: list[tuple[str, list[int]]], new: int, concurrency: int, extra: dict) -> dict:
    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(timeout=600, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda job: stream_one(client, url, job[0], job[1], new, extra), jobs))
        wall = time.perf_counter() - start
    return summary([r[0] for r in results], sum(r[1] for r in results), wall)


def summary(ttfts: list[float], tokens: int, wall: float) -> dict:
    ttfts = sorted(ttfts)
    return {
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "tokens_per_s": tokens / wall,
    }


def system_prompt_case(url: str, models: list[str], extra: dict) -> dict:
    rng = random.Random(1)
    systems = [ids(800, rng) for _ in range(ADAPTERS)]  # one per adapter; vLLM: 8 on its one model
    jobs = [(models[i % len(models)], systems[i % ADAPTERS] + ids(50, rng)) for i in range(64)]
    return run_load(url, jobs, 64, 16, extra)


def chat_case(url: str, model: str, extra: dict) -> dict:
    rng = random.Random(2)
    conversations = [ids(200, rng) for _ in range(8)]
    turns = [[(ids(50, rng), ids(64, rng)) for _ in range(4)] for _ in conversations]

    def conversation(i: int) -> tuple[list[float], int]:
        history, ttfts, tokens = list(conversations[i]), [], 0
        with httpx.Client(timeout=600) as client:
            for user, reply in turns[i]:
                history += user
                ttft, n = stream_one(client, url, model, history, 64, extra)
                ttfts.append(ttft)
                tokens += n
                history += reply  # the client resends the conversation so far
        return ttfts, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(conversations)) as pool:
        results = list(pool.map(conversation, range(len(conversations))))
    wall = time.perf_counter() - start
    return summary([t for r in results for t in r[0]], sum(r[1] for r in results), wall)


def measure(url: str, models: list[str], extra: dict) -> dict:
    out = {}
    for name, case in (
        ("repeat", lambda: repeat_case(url, models[0], extra)),
        ("system_prompts", lambda: system_prompt_case(url, models, extra)),
        ("chat", lambda: chat_case(url, models[0], extra)),
    ):
        out[name] = case()
        print(f"  {name}: {json.dumps(out[name])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--dtype", default="float32")  # bf16 only on CPUs with native bf16 (AVX512-BF16, AMX)
    ap.add_argument("--servers", default="prefixserve,no-cache,vllm", help="which to run, in this order")
    ap.add_argument("--out", type=Path, default=HERE / "prefix_cache.json")
    args = ap.parse_args()
    tmp = scratch_dir("prefixserve-prefix-cache-")
    model = build_model(tmp / "model")
    adapters = build_adapters(model, tmp / "adapters", ADAPTERS, VIRTUAL)
    names = [f"a{i}" for i in range(ADAPTERS)]
    results: dict = {"dtype": args.dtype}
    servers = args.servers.split(",")
    runs = (
        ("prefixserve", "prefixserve", ()),
        ("no-cache", "prefixserve --no-prefix-caching", ("--no-prefix-caching",)),
    )
    for key, label, flags in runs:
        if key not in servers:
            continue
        server = start_prefixserve(model, args.dtype, tmp, *flags)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for name, path in zip(names, adapters, strict=True):
                    client.put(f"/v1/adapters/{name}", files=upload_files(path)).raise_for_status()
            print(label, flush=True)
            results[label] = measure(server.url, names, {"ignore_eos": True})
        finally:
            server.stop()
    if "vllm" in servers:
        server = start_vllm(args.vllm_python, model, args.dtype, tmp, 1024, ("--enable-prefix-caching",))
        try:
            print("vllm (base model)", flush=True)
            results["vllm"] = measure(server.url, ["base"], {"ignore_eos": True})
        finally:
            server.stop()
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
