"""prefixserve (every request on its own adapter) vs vLLM's CPU build (the base model alone), side by side.

The same models (GPT-2 124M and a Qwen2.5-0.5B shape, random weights, built locally), the same client, the
same requests, one server at a time on this machine: OpenAI `/v1/completions`, 32-token prompts given as token
ids, 32 new tokens, greedy, at several concurrency levels and dtypes. prefixserve serves 16 adapters (T=20),
request i on adapter i % 16, once per attention backend (`--attention native,portable`: the kernel's effect
in the same run); vLLM cannot serve prefix adapters, so it serves the base model, the ceiling. Time to first
token at 512- and 2,048-token prompts (one request at a time, the better of two) measures prefill. A last
case puts 64 concurrent rows on one T=512 adapter in a 256 MB KV pool (prefixserve stores the prefix once; a
copy per row would need 64 x 512 tokens of cache).

    bash bench/setup_vllm.sh                 # vLLM in its own virtual environment (.venv-vllm)
    python -m bench.bench_vs_vllm            # writes bench/vs_vllm.json and bench/vs_vllm.png
    python -m bench.bench_vs_vllm --shapes gpt2,qwen0.5b --dtypes float32 --concurrency 16,64 --skip-shared-prefix

Throughput counts the completion tokens the server reports (`usage`), over the wall time of the whole load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from bench.bench_engine import VOCAB, build_adapters, build_model
from bench.scratch import scratch_dir
from tests.server_process import free_port, upload_files

HERE = Path(__file__).parent
PROMPT_TOKENS, NEW_TOKENS, ADAPTERS, VIRTUAL = 32, 32, 16, 20
TTFT_PROMPTS = (512, 2048)
MAX_MODEL_LEN = 4096  # room for the longest TTFT prompt


def build_qwen(out: Path) -> Path:
    """Qwen2.5-0.5B's shape (GQA 14/2, SwiGLU, RMSNorm, RoPE, tied embeddings) with GPT-2's vocabulary size,
    so one word-level tokenizer serves both shapes."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        eos_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 1,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{VOCAB - 1}").save_pretrained(out)
    return out


SHAPES = {"gpt2": build_model, "qwen0.5b": build_qwen}


class Server:
    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        self.log = log

    def wait(self, timeout: float) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not up after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def start_prefixserve(
    model: Path, dtype: str, tmp: Path, kv_cache_mb: float | None = None, attention: str = "auto"
) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "prefixserve", "serve", "--model", str(model), "--dtype", dtype]
    argv += ["--port", str(port), "--adapter-dir", str(tmp / f"store-{model.name}-{dtype}-{kv_cache_mb}")]
    argv += ["--max-total-tokens", str(MAX_MODEL_LEN), "--max-input-tokens", str(MAX_MODEL_LEN - NEW_TOKENS)]
    argv += [
        "--max-queue-size",
        "1024",
        "--max-concurrent-per-tenant",
        "1024",
        "--attention-backend",
        attention,
    ]
    argv += ["--max-prefill-tokens", str(MAX_MODEL_LEN)]
    if kv_cache_mb:
        argv += ["--kv-cache-mb", str(kv_cache_mb), "--max-virtual-tokens", "512"]
    log = tmp / f"prefixserve-{model.name}-{dtype}-{attention}.log"
    return Server(argv, {}, port, log).wait(300)


def start_vllm(
    python: str,
    model: Path,
    dtype: str,
    tmp: Path,
    max_model_len: int = MAX_MODEL_LEN,
    extra: tuple[str, ...] = (),
) -> Server:
    port = free_port()
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    argv += ["--max-model-len", str(max_model_len), "--dtype", dtype, "--served-model-name", "base", *extra]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
    return Server(argv, env, port, tmp / f"vllm-{model.name}-{dtype}.log").wait(900)


def load(url: str, models: list[str], prompts: list[list[int]], concurrency: int, extra: dict) -> float:
    """Send every prompt (request i names models[i % len]) from `concurrency` client threads; tokens/s."""

    def one(client: httpx.Client, i: int) -> int:
        body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": NEW_TOKENS}
        body.update(temperature=0, **extra)
        response = client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(timeout=600, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: one(client, i), range(min(concurrency, 8))))  # warm-up
        start = time.perf_counter()
        tokens = sum(pool.map(lambda i: one(client, i), range(len(prompts))))
        return tokens / (time.perf_counter() - start)


def requests_for(concurrency: int) -> int:
    return max(32, 4 * concurrency)  # every client thread sends at least four


def ttft(url: str, model: str, prompts: list[list[int]], extra: dict) -> float:
    """Seconds to the first token of one request alone (max_tokens 1: the prefill), the better of two with
    different prompts (the first may pay for warm-up; the same prompt twice would hit the prefix cache)."""
    times = []
    with httpx.Client(timeout=600) as client:
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
            start = time.perf_counter()
            response = client.post(f"{url}/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{url} refused a {len(prompt)}-token prompt: {response.text}")
            times.append(time.perf_counter() - start)
    return min(times)


def measure(
    server: Server, key: str, models: list[str], prompts, long_prompts, levels, extra, results
) -> None:
    for c in levels:
        tps = load(server.url, models, prompts[: requests_for(c)], c, extra)
        results.setdefault(key, {})[c] = tps
        print(f"{key} concurrency {c}: {tps:.1f} tokens/s", flush=True)
    context = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    for n, pair in long_prompts.items():
        if n + 1 > context:  # GPT-2's 1,024 positions hold no 2,048-token prompt
            print(f"{key} TTFT at a {n}-token prompt: n/a, the model's context is {context}", flush=True)
            continue
        seconds = ttft(server.url, models[0], pair, extra)
        results.setdefault("ttft", {}).setdefault(key, {})[n] = seconds
        print(f"{key} TTFT at a {n}-token prompt: {seconds:.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--shapes", default="gpt2,qwen0.5b")
    ap.add_argument("--concurrency", default="1,16,64,128")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--attention", default="native,portable", help="prefixserve's --attention-backend(s)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-shared-prefix", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "vs_vllm.json")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip() not in ("", "0")]  # 0: TTFT only
    tmp = scratch_dir("prefixserve-vs-vllm-")
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        0, VOCAB - 1, (requests_for(max(levels, default=1)), PROMPT_TOKENS), generator=generator
    ).tolist()
    long_prompts = (
        {}
        if args.skip_ttft
        else {n: torch.randint(0, VOCAB - 1, (2, n), generator=generator).tolist() for n in TTFT_PROMPTS}
    )
    results: dict = {"date": str(date.today()), "machine": f"{os.cpu_count()} cores {platform.machine()}"}
    results["versions"] = {"torch": torch.__version__, "prefixserve": _version("prefixserve")}
    names = [f"a{i}" for i in range(ADAPTERS)]
    for shape in args.shapes.split(","):
        model = SHAPES[shape](tmp / shape)
        adapters = build_adapters(model, tmp / f"adapters-{shape}", ADAPTERS, VIRTUAL)
        for dtype in args.dtypes.split(","):
            for attention in args.attention.split(","):
                server = start_prefixserve(model, dtype, tmp, attention=attention)
                try:
                    with httpx.Client(base_url=server.url, timeout=60) as client:
                        for i, path in enumerate(adapters):
                            client.put(f"/v1/adapters/a{i}", files=upload_files(path)).raise_for_status()
                    key = f"prefixserve-{attention}/{shape}/{dtype}"
                    measure(server, key, names, prompts, long_prompts, levels, {}, results)
                finally:
                    server.stop()
            if args.skip_vllm:
                continue
            config = AutoConfig.from_pretrained(model)
            positions = getattr(config, "max_position_embeddings", None) or config.n_positions
            server = start_vllm(args.vllm_python, model, dtype, tmp, min(MAX_MODEL_LEN, positions))
            try:
                key = f"vllm/{shape}/{dtype}"
                measure(server, key, ["base"], prompts, long_prompts, levels, {"ignore_eos": True}, results)
            finally:
                server.stop()
        if not args.skip_shared_prefix and shape == "gpt2":
            long_adapter = build_adapters(model, tmp / "long", 1, 512)[0]
            results["shared_prefix"] = shared_prefix_case(model, long_adapter, prompts, tmp)
    if not args.skip_vllm:
        results["versions"]["vllm"] = _version("vllm", args.vllm_python)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results, indent=2))


def shared_prefix_case(model: Path, adapter: Path, prompts: list[list[int]], tmp: Path) -> dict:
    """64 concurrent rows on one T=512 adapter, bf16, in a 256 MB pool."""
    server = start_prefixserve(model, "bfloat16", tmp, kv_cache_mb=256)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            client.put("/v1/adapters/long", files=upload_files(adapter)).raise_for_status()
        tps = load(server.url, ["long"], prompts[:128], 64, {})
        metrics = httpx.get(f"{server.url}/metrics").text
        preempted = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("prefixserve_preemptions_total")
        )
    finally:
        server.stop()
    print(f"shared prefix T=512, 64 concurrent, 256 MB pool: {tps:.1f} tokens/s, {preempted:.0f} preemptions")
    return {"tokens_per_s": tps, "preemptions": preempted}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, series in results.items():
        if key.count("/") != 2:
            continue
        levels = sorted(int(c) for c in series)
        style = "-o" if key.startswith("prefixserve") else "--s"
        label = f"{key} ({'16 adapters, T=20' if key.startswith('prefixserve') else 'base model'})"
        ax.plot(levels, [series[c] if c in series else series[str(c)] for c in levels], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"GPT-2 124M and Qwen2.5-0.5B shapes, {results['machine']}, {results['date']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _version(package: str, python: str = sys.executable) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    for name in (package, f"{package}-cpu"):
        out = subprocess.run(
            [python, "-c", code.replace(repr(package), repr(name))], capture_output=True, text=True
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


if __name__ == "__main__":
    main()
