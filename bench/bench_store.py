"""Adapter load latency from an S3 bucket vs from a directory, and listing time (issue 11).

A cold load is what a request for an adapter that is not in the registry's memory costs: the registry's
miss path (store.load: read + sha256 verification + parse, then validation and the [L, 2, H, T, D] layout),
timed around `registry.get` after the adapter was evicted. `store.load` alone and `fingerprint` (the
refresh check: a HEAD on S3, a stat on disk) are timed too. GPT-2 124M shape (12 layers x 2 x 768 per
virtual token, float32), a small adapter (T=20, 1.5 MB) and a large one (T=256, 18.9 MB); N loads of each,
backends interleaved so that drift in the machine's load hits both alike.

S3 is SeaweedFS (`weed mini`, started here on loopback, as the tests do); the directory is on local disk,
in the page cache after the first read, so it is the best case for a directory (NFS adds its round trips).

    python -m bench.bench_store [--loads 50] [--list 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from bench.scratch import scratch_dir
from prefixserve.adapters.format import PeftAdapter
from prefixserve.adapters.kv_prefix import KVShape
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store import AdapterStore
from prefixserve.adapters.stores import open_store
from tests.s3_server import start_s3_server

GPT2 = KVShape(num_layers=12, num_kv_heads=12, head_dim=64, hidden_size=768)
NAMESPACE = "bench"


def make_adapter(t: int, seed: int) -> PeftAdapter:
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": t,
        "num_layers": GPT2.num_layers,
        "num_attention_heads": GPT2.num_kv_heads,
        "token_dim": GPT2.num_kv_heads * GPT2.head_dim,
        "prefix_projection": False,
    }
    embeddings = torch.randn(t, GPT2.token_width, generator=torch.Generator().manual_seed(seed))
    return PeftAdapter(config, embeddings)


def registry(store: AdapterStore) -> AdapterRegistry:
    return AdapterRegistry(store, GPT2, torch.float32, torch.device("cpu"), 2**30, 256, refresh_seconds=60)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"{statistics.median(ms):8.2f} {p90:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loads", type=int, default=50, help="loads per adapter size and backend")
    ap.add_argument("--list", type=int, default=500, help="adapters in the listing test")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = scratch_dir("prefixserve-bench-store-")
    s3 = start_s3_server(tmp / "seaweedfs")
    try:
        os.environ.update(s3.env())  # the standard AWS variables, read by the store's boto3 client
        bucket = s3.new_bucket()
        stores: dict[str, AdapterStore] = {
            "directory": open_store(tmp / "store"),
            "s3": open_store(f"s3://{bucket}/bench"),
        }
        registries = {name: registry(store) for name, store in stores.items()}
        sizes = {"T=20": make_adapter(20, 0), "T=256": make_adapter(256, 1)}
        for store in stores.values():
            for size, adapter in sizes.items():
                store.put(NAMESPACE, size.lower().replace("=", ""), adapter)
        results: dict[tuple[str, str, str], list[float]] = {}
        for _ in range(args.loads):
            for size in sizes:
                adapter_id = size.lower().replace("=", "")
                for name, store in stores.items():
                    reg = registries[name]
                    reg.invalidate(NAMESPACE, adapter_id)
                    results.setdefault((size, name, "registry cold load"), []).append(
                        timed(lambda reg=reg, a=adapter_id: reg.get(NAMESPACE, (a,)))
                    )
                    results.setdefault((size, name, "store.load"), []).append(
                        timed(lambda store=store, a=adapter_id: store.load(NAMESPACE, a))
                    )
                    results.setdefault((size, name, "fingerprint"), []).append(
                        timed(lambda store=store, a=adapter_id: store.fingerprint(NAMESPACE, a))
                    )
        print(f"{args.loads} loads each; milliseconds")
        print(f"{'adapter':>7} {'bytes':>10} {'backend':>10} {'what':>20} {'median':>8} {'p90':>8}")
        for (size, name, what), seconds in results.items():
            nbytes = sizes[size].embeddings.numel() * 4
            print(f"{size:>7} {nbytes:>10,} {name:>10} {what:>20} {summary(seconds)}")

        # Listing: N adapters (T=1: a listing reads headers only, whatever the size); a fresh store instance
        # (nothing cached: another replica, or a restart), then the same instance again (S3: headers cached by
        # ETag, one ListObjectsV2 page per 1,000; directory: every header read again).
        print(f"\nlisting {args.list} adapters; seconds")
        small = make_adapter(1, 2)
        for store in stores.values():
            for i in range(args.list):
                store.put("listing", f"adapter-{i:04d}", small)
        print(f"{'backend':>10} {'first listing':>14} {'again':>8}")
        for name in stores:
            fresh = open_store(tmp / "store" if name == "directory" else f"s3://{bucket}/bench")
            first = timed(lambda fresh=fresh: fresh.list("listing"))
            again = min(timed(lambda fresh=fresh: fresh.list("listing")) for _ in range(3))
            assert len(fresh.list("listing")) == args.list
            print(f"{name:>10} {first:>14.3f} {again:>8.3f}")
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
