"""Soak: N clients for T seconds against one server, mixed adapters, streams, early disconnects.

Each client thread sends its next request as soon as its last one ends, choosing at random (seeded) among:
`/generate` and `/v1/completions` (whole answers), `/generate_stream` and `/v1/chat/completions` streams read to
the end, streams dropped after a few events (an early disconnect), and now and then an adapter replaced by
`PUT` from a text. Adapters: none, the three examples of `adapters/`, one composition, and one made from text.
Reports requests by kind, failures other than 429 (with their first messages), tokens/s, p50/p99 latency of
whole requests, and the server's resident memory after the warm-up, at a baseline (2 minutes in), each minute,
at the end, and at its peak: a 30-minute soak must end within 5 % of its baseline.

    python -m bench.soak --clients 8 --seconds 600              # starts its own server (the demo model)
    python -m bench.soak --url http://127.0.0.1:8000 --pid 1234  # or an existing one (the pid for memory)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.scratch import scratch_dir
from tests.server_process import ServerProcess, upload_files

EXAMPLES = Path(__file__).resolve().parent.parent / "adapters"
ADAPTERS = [None, "pirate", "support", "counting", "pirate+counting", "persona"]
PROMPTS = ["Tell me about the sea", "Once upon a time", "How do I reset my password?", "Count with me: 1 2 3"]
KINDS = {"generate": 3, "completion": 2, "stream": 3, "chat_stream": 2, "disconnect": 2, "put_from_text": 1}


@dataclass
class Tally:
    requests: Counter = field(default_factory=Counter)
    throttled: int = 0  # 429s: the server saying "later", by design
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # whole requests, streams read to the end
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self, kind: str, status: int, seconds: float | None, tokens: int, error: str | None = None
    ) -> None:
        with self.lock:
            self.requests[kind] += 1
            self.tokens += tokens
            if status == 429:
                self.throttled += 1
            elif error is not None or status >= 400:
                self.failures.append(f"{kind}: {status} {error or ''}"[:300])
            elif seconds is not None:
                self.latencies.append(seconds)


def one_request(client: httpx.Client, rng: random.Random, tally: Tally) -> None:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    adapter, prompt = rng.choice(ADAPTERS), rng.choice(PROMPTS)
    new = rng.randint(4, 48)
    params = {"adapter_id": adapter, "max_new_tokens": new, "details": True}
    if rng.random() < 0.5:
        params.update(do_sample=True, temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
    start = time.perf_counter()
    status, tokens, error, whole = 0, 0, None, True
    try:
        if kind == "generate":
            r = client.post("/generate", json={"inputs": prompt, "parameters": params})
            status = r.status_code
            tokens = r.json()["details"]["generated_tokens"] if status == 200 else 0
        elif kind == "completion":
            body = {"model": adapter or "", "prompt": prompt, "max_tokens": new, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            status = r.status_code
            tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
        elif kind in ("stream", "disconnect"):
            whole = kind == "stream"
            stop_after = None if whole else rng.randint(1, 4)
            with client.stream(
                "POST", "/generate_stream", json={"inputs": prompt, "parameters": params}
            ) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        if '"error"' in line:
                            error = line
                        tokens += 1
                        if stop_after is not None and tokens >= stop_after:
                            break  # hang up mid-stream: the server must free the row
        elif kind == "chat_stream":
            body = {
                "model": adapter or "",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": new,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"usage": {' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                    elif '"error"' in line:
                        error = line
        else:  # replace the text-made adapter while others use it
            text = f"You are a helpful assistant, version {rng.randrange(1000)}."
            r = client.put("/v1/adapters/persona", json={"from_text": text})
            status = r.status_code
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if status >= 400 and error is None and status != 429:
        error = r.text
    tally.add(kind, status, time.perf_counter() - start if whole else None, tokens, error)


def client_loop(url: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            one_request(client, rng, tally)


def setup_adapters(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for name in ("pirate", "support", "counting"):
            client.put(f"/v1/adapters/{name}", files=upload_files(EXAMPLES / name)).raise_for_status()
        client.put(
            "/v1/adapters/persona", json={"from_text": "You are a helpful assistant."}
        ).raise_for_status()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


def soak(url: str, pid: int, clients: int, seconds: float, baseline_seconds: float = 120) -> dict:
    process = psutil.Process(pid)
    setup_adapters(url)
    warm = Tally()  # a short warm-up, so the memory baseline includes what a loaded server holds anyway
    warm_threads = [
        threading.Thread(target=client_loop, args=(url, 1000 + i, time.monotonic() + 10, warm))
        for i in range(clients)
    ]
    for t in warm_threads:
        t.start()
    for t in warm_threads:
        t.join()
    rss_before = peak = process.memory_info().rss
    tally, start = Tally(), time.monotonic()
    deadline = start + seconds
    threads = [threading.Thread(target=client_loop, args=(url, i, deadline, tally)) for i in range(clients)]
    for t in threads:
        t.start()
    baseline, series = None, []  # the resident set `baseline_seconds` in, and once a minute
    while any(t.is_alive() for t in threads):
        rss, now = process.memory_info().rss, time.monotonic() - start
        peak = max(peak, rss)
        if baseline is None and now >= min(baseline_seconds, seconds / 2):
            baseline = rss
        if now >= 60 * len(series):
            series.append(round(rss / 2**20, 1))
        time.sleep(1)
    elapsed = time.monotonic() - start
    rss_after = process.memory_info().rss
    metrics = httpx.get(f"{url}/metrics").text
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": sum(tally.requests.values()),
        "by_kind": dict(tally.requests),
        "throttled_429": tally.throttled,
        "failures_not_429": len(tally.failures),
        "first_failures": tally.failures[:5],
        "tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / elapsed, 1),
        "latency_p50_s": round(percentile(tally.latencies, 50), 3),
        "latency_p99_s": round(percentile(tally.latencies, 99), 3),
        "rss_mb_before": round(rss_before / 2**20, 1),
        "rss_mb_after": round(rss_after / 2**20, 1),
        "rss_mb_peak": round(peak / 2**20, 1),
        "rss_mb_at_baseline": round((baseline or rss_after) / 2**20, 1),
        "baseline_s": min(baseline_seconds, seconds / 2),
        "rss_end_over_baseline": round(rss_after / (baseline or rss_after), 3),
        "rss_mb_each_minute": series,
        "batch_size_after": next(
            (
                line.split()[-1]
                for line in metrics.splitlines()
                if line.startswith("prefixserve_batch_current_size")
            ),
            None,
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--url", help="an existing server (default: start one with the demo model)")
    ap.add_argument("--pid", type=int, help="the existing server's process id, for its memory")
    ap.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    ap.add_argument(
        "--baseline-seconds", type=float, default=120, help="when the memory baseline is taken (or half-way)"
    )
    args = ap.parse_args()
    server = None
    if args.url is None:
        tmp = scratch_dir("prefixserve-soak-")
        server = ServerProcess(["--adapter-dir", str(tmp / "store")], tmp / "server.log").wait_healthy()
    try:
        url, pid = (args.url, args.pid) if server is None else (server.url, server.proc.pid)
        if pid is None:
            ap.error("--pid is needed with --url, to read the server's memory")
        result = soak(url, pid, args.clients, args.seconds, args.baseline_seconds)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
