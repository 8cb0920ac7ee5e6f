"""Several replicas behind HAProxy on loopback, sharing one adapter store (issues 5 and 11).

Three real `prefixserve serve` processes share one adapter store; HAProxy runs docker/haproxy.cfg with only
its addresses changed to this machine's loopback ports. Checked here: an adapter uploaded through the
balancer is served alike by every replica; a replaced or deleted adapter is noticed by every replica within
the refresh interval; concurrent uploads of one id leave one whole version; and a replica stopped (SIGTERM)
under load is routed around with no failed request other than those it had in flight.

The store is a shared directory for all of it, and a bucket of a real SeaweedFS on loopback
(`--adapter-dir s3://...`) for what depends on the store: upload, replace and delete seen by every replica.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.paths import REPO_ROOT
from tests.server_process import free_port, stop_process

pytestmark = [pytest.mark.external, pytest.mark.slow]  # HAProxy, three replicas (and SeaweedFS)

HAPROXY_CFG = REPO_ROOT / "docker" / "haproxy.cfg"
REPLICAS = ("replica-1", "replica-2", "replica-3")  # the server names in docker/haproxy.cfg
REFRESH_SECONDS = 0.5
# A replica must show a replaced or deleted adapter within the refresh interval plus the time one polling
# round takes (each poll is a generation on each replica); STALENESS_BOUND only ends the polling.
STALENESS_ASSERTED = REFRESH_SECONDS + 1.5
STALENESS_BOUND = REFRESH_SECONDS + 4.0
DRAIN_SECONDS = 5
PROMPTS = ("Hello", "Once upon a time")
MAX_NEW_TOKENS = 8

# Load phase: bounded in requests and in time.
LOAD_THREADS = 6
LOAD_MAX_REQUESTS = 600
LOAD_SECONDS = 9.0
LOAD_NEW_TOKENS = 160
SIGTERM_AFTER = 2.5
AFTER_EXIT_SECONDS = 3.0


class Replica:
    def __init__(self, name: str, store: str, log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            "-c",
            "from prefixserve.cli import main; main()",
            "serve",
            "--model",
            "tiny",
            "--adapter-dir",
            store,
            "--port",
            str(self.port),
            "--adapter-refresh-seconds",
            str(REFRESH_SECONDS),
            "--drain-seconds",
            str(DRAIN_SECONDS),
            "--num-threads",
            "1",
            "--max-total-tokens",
            "512",
            "--max-input-tokens",
            "128",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
        env = {k: v for k, v in env.items() if not k.startswith("PREFIXSERVE_")}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not healthy in time:\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def loopback_config(text: str, lb_port: int, stats_port: int, ports: dict[str, int]) -> str:
    """docker/haproxy.cfg with every address moved to 127.0.0.1: the frontends' binds and the servers."""
    out, section, servers = [], "", Counter()
    for line in text.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        words = stripped.split()
        if words[:1] == ["bind"]:
            port = stats_port if section == "frontend stats" else lb_port
            line = f"    bind 127.0.0.1:{port}"
        elif words[:1] == ["server"]:
            name = words[1]
            if name not in ports:
                continue
            words[2] = f"127.0.0.1:{ports[name]}"
            line = "    " + " ".join(words)
            servers[name] += 1
        elif words[:1] == ["default-server"]:
            line = re.sub(r"\s+resolvers\s+\S+", "", line)
        out.append(line)
    assert sorted(servers) == sorted(ports) and set(servers.values()) == {2}, servers
    assert {"frontend prefixserve", "frontend stats"} <= {ln.strip() for ln in out}
    return "\n".join(out) + "\n"


class Balancer:
    def __init__(self, workdir: Path, ports: dict[str, int]) -> None:
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(loopback_config(HAPROXY_CFG.read_text(), self.port, self.stats_port, ports))
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0 and "WARNING" not in check.stderr + check.stdout, check.stderr
        self.log_path = workdir / "haproxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.cfg)], stdout=self._log, stderr=subprocess.STDOUT
        )

    def stats(self) -> list[dict[str, str]]:
        r = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2.0)
        r.raise_for_status()
        return list(csv.DictReader(io.StringIO(r.text.lstrip("# "))))

    def server_rows(self, name: str) -> list[dict[str, str]]:
        return [row for row in self.stats() if row["svname"] == name]

    def wait_all_up(self, names: tuple[str, ...], deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log_path.read_text(errors='replace')}")
            try:
                rows = [r for r in self.stats() if r["pxname"] == "by_adapter" and r["svname"] in names]
                if len(rows) == len(names) and all(r["status"] == "UP" for r in rows):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"not all servers UP: {self.stats()}")

    def wait_status(self, name: str, prefix: str, deadline: float) -> str:
        status = ""
        while time.monotonic() < deadline:
            status = next(r["status"] for r in self.server_rows(name) if r["pxname"] == "by_adapter")
            if status.startswith(prefix):
                return status
            time.sleep(0.2)
        return status

    def requests_log_with(self, rids, timeout: float = 10.0) -> dict[str, dict[str, str]]:
        """`requests_log()` once every id in `rids` is in it (HAProxy writes a line after the request ends)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.requests_log()
            if all(rid in log for rid in rids) or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def requests_log(self) -> dict[str, dict[str, str]]:
        """Request id -> backend, server, status, termination state, retries, from HAProxy's httplog lines."""
        pattern = re.compile(
            r" (?P<backend>\S+)/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+ \S+ \S+ (?P<term>\S{4}) "
            r"\d+/\d+/\d+/\d+/(?P<retries>\+?\d+) \S+ \{(?P<rid>[^|}]*)\|(?P<adapter>[^}]*)\}"
        )
        out = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m and m["rid"]:
                out[m["rid"]] = m.groupdict()
        return out

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        self._log.close()


@dataclass
class Cluster:
    workdir: Path
    replicas: dict[str, Replica]
    balancer: Balancer
    adapters: dict[str, Path] = field(default_factory=dict)


def make_adapter(out_dir: Path, seed: int) -> Path:
    """A PEFT prefix-tuning adapter of the demo model with random (seeded) prompt-encoder weights."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prefixserve.demo import DEMO_MODEL_DIR

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1, generator=generator)
    model.save_pretrained(out_dir)
    return out_dir


def upload_files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (name, (adapter_dir / name).read_bytes(), "application/octet-stream"))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]


# The store each test runs on: the shared directory for every test; S3 for those that depend on the store
# (the rest, routing and draining, is the balancer's and the server's, whatever the store).
BOTH_STORES = pytest.mark.parametrize("cluster", ["directory", "s3"], indirect=True)
DIRECTORY = pytest.mark.parametrize("cluster", ["directory"], indirect=True)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: scripts/setup-dev.sh installs it (apt-get install haproxy)")
    tmp = tmp_path_factory.mktemp(f"multi-{request.param}")
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        store, env = f"s3://{s3.new_bucket()}/replicas", s3.env()
    else:
        (tmp / "shared-store").mkdir()
        store, env = str(tmp / "shared-store"), {}
    replicas: dict[str, Replica] = {}
    balancer = None
    try:
        for name in REPLICAS:
            replicas[name] = Replica(name, store, tmp / f"{name}.log", env)
        # While the replicas load their model: the adapters (PEFT, random prompt encoders).
        adapters = {f"v{seed}": make_adapter(tmp / f"adapter-v{seed}", seed) for seed in (1, 2)}
        deadline = time.monotonic() + 90
        for replica in replicas.values():
            replica.wait_healthy(deadline)
            if request.param == "s3":
                assert f"adapter store: {store} (S3 endpoint {s3.endpoint})" in replica.log_path.read_text()
        balancer = Balancer(tmp, {name: r.port for name, r in replicas.items()})
        balancer.wait_all_up(REPLICAS, time.monotonic() + 30)
        yield Cluster(tmp, replicas, balancer, adapters)
    finally:
        for replica in replicas.values():
            replica.stop()
        if balancer is not None:
            balancer.stop()


def generate(url: str, adapter_id: str | None, prompt: str, header: bool = False) -> httpx.Response:
    params: dict[str, object] = {"max_new_tokens": MAX_NEW_TOKENS, "details": True}
    headers = {}
    if header and adapter_id:
        headers["X-Adapter-Id"] = adapter_id
    else:
        params["adapter_id"] = adapter_id
    return httpx.post(
        f"{url}/generate", json={"inputs": prompt, "parameters": params}, headers=headers, timeout=30
    )


def outputs(url: str, adapter_id: str | None, header: bool = False) -> tuple | int:
    """Greedy text and token ids for every prompt, or the first non-200 status."""
    out = []
    for prompt in PROMPTS:
        r = generate(url, adapter_id, prompt, header)
        if r.status_code != 200:
            return r.status_code
        body = r.json()
        out.append((body["generated_text"], tuple(t["id"] for t in body["details"]["tokens"])))
    return tuple(out)


def wait_until(cluster: Cluster, adapter_id: str, expected: tuple | int) -> dict[str, float]:
    """Poll every replica directly until it answers `expected`; seconds each took. Bounded by STALENESS_BOUND."""
    start = time.monotonic()
    took: dict[str, float] = {}
    last: dict[str, object] = {}
    while len(took) < len(cluster.replicas) and time.monotonic() - start < STALENESS_BOUND:
        for name, replica in cluster.replicas.items():
            if name not in took:
                last[name] = outputs(replica.url, adapter_id)
                if last[name] == expected:
                    took[name] = time.monotonic() - start
        time.sleep(0.05)
    assert len(took) == len(cluster.replicas), f"stale after {STALENESS_BOUND}s: {last} (expected {expected})"
    assert max(took.values()) <= STALENESS_ASSERTED, f"stale for {max(took.values()):.2f}s: {took}"
    # And no replica goes back to an old version afterwards.
    for replica in cluster.replicas.values():
        assert outputs(replica.url, adapter_id) == expected
    return took


def version_outputs(cluster: Cluster, version: str) -> tuple:
    """What a version generates, read from an id that only ever held that version (never stale anywhere)."""
    r = httpx.put(
        f"{cluster.balancer.url}/v1/adapters/probe-{version}",
        files=upload_files(cluster.adapters[version]),
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    return outputs(cluster.replicas["replica-1"].url, f"probe-{version}")


def ensure(cluster: Cluster, adapter_id: str, version: str) -> tuple:
    """Make `adapter_id` hold `version` on every replica, whatever ran before (tests run in any order)."""
    expected = version_outputs(cluster, version)
    r = httpx.put(
        f"{cluster.balancer.url}/v1/adapters/{adapter_id}",
        files=upload_files(cluster.adapters[version]),
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    deadline = time.monotonic() + STALENESS_BOUND
    while time.monotonic() < deadline:
        if all(outputs(rep.url, adapter_id) == expected for rep in cluster.replicas.values()):
            return expected
        time.sleep(0.05)
    raise AssertionError(f"{adapter_id} did not reach {version} on every replica")


@BOTH_STORES
def test_upload_through_balancer_then_every_replica_serves_it(cluster):
    lb = cluster.balancer.url
    adapter_id = f"fresh-{uuid.uuid4().hex[:8]}"
    r = httpx.put(f"{lb}/v1/adapters/{adapter_id}", files=upload_files(cluster.adapters["v1"]), timeout=30)
    assert r.status_code == 201, r.text
    sha_v1 = r.json()["sha256"]

    base = outputs(lb, None)
    v1 = outputs(lb, adapter_id)
    assert isinstance(v1, tuple) and isinstance(base, tuple)
    assert v1 != base, "the adapter should change the base model's output"
    assert outputs(lb, adapter_id, header=True) == v1  # affinity backend (X-Adapter-Id)
    for name, replica in cluster.replicas.items():
        assert outputs(replica.url, adapter_id) == v1, name
        assert outputs(replica.url, adapter_id, header=True) == v1, name
        assert outputs(replica.url, None) == base, name
        info = httpx.get(f"{replica.url}/v1/adapters/{adapter_id}", timeout=10).json()
        assert info["sha256"] == sha_v1, name


@DIRECTORY
def test_header_requests_stick_to_one_replica(cluster):
    """Consistent hashing on X-Adapter-Id: one adapter, one replica (when there is no overload)."""
    ensure(cluster, "shared", "v1")
    lb = cluster.balancer.url
    rids = []
    for _ in range(6):
        rid = uuid.uuid4().hex
        r = httpx.post(
            f"{lb}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
            headers={"X-Adapter-Id": "shared", "X-Request-Id": rid},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["X-Request-Id"] == rid
        rids.append(rid)
    log = cluster.balancer.requests_log_with(rids)
    assert {log[rid]["backend"] for rid in rids} == {"by_adapter"}
    assert len({log[rid]["server"] for rid in rids}) == 1, [log[rid] for rid in rids]
    # Without the header: least connections; the balancer gives the request an id the replica keeps.
    r = httpx.get(f"{lb}/v1/adapters", timeout=10)
    assert r.status_code == 200 and re.fullmatch(r"[0-9A-F-]{20,}", r.headers["X-Request-Id"])


@BOTH_STORES
def test_replaced_adapter_is_seen_by_every_replica_within_refresh(cluster):
    lb = cluster.balancer.url
    v1 = ensure(cluster, "shared", "v1")
    v2 = version_outputs(cluster, "v2")
    assert isinstance(v2, tuple) and v2 != v1

    for replica in cluster.replicas.values():  # every replica holds v1 warm in its cache
        assert outputs(replica.url, "shared") == v1
    r = httpx.put(f"{lb}/v1/adapters/shared", files=upload_files(cluster.adapters["v2"]), timeout=30)
    assert r.status_code == 200, r.text  # replaced
    took = wait_until(cluster, "shared", v2)
    print(
        f"\nreplace: each replica served the new version after {sorted(round(t, 2) for t in took.values())} s"
    )
    assert outputs(lb, "shared") == v2 and outputs(lb, "shared", header=True) == v2


@BOTH_STORES
def test_deleted_adapter_is_404_on_every_replica_within_refresh(cluster):
    lb = cluster.balancer.url
    ensure(cluster, "shared", "v1")
    for replica in cluster.replicas.values():  # warm everywhere
        assert isinstance(outputs(replica.url, "shared"), tuple)
    r = httpx.delete(f"{lb}/v1/adapters/shared", timeout=30)
    assert r.status_code == 204, r.text
    took = wait_until(cluster, "shared", 404)
    print(f"\ndelete: each replica answered 404 after {sorted(round(t, 2) for t in took.values())} s")
    for replica in cluster.replicas.values():
        assert httpx.get(f"{replica.url}/v1/adapters/shared", timeout=10).status_code == 404
    assert outputs(lb, "shared", header=True) == 404


@DIRECTORY
def test_concurrent_uploads_of_one_id_leave_one_whole_version(cluster):
    files = {v: upload_files(cluster.adapters[v]) for v in ("v1", "v2")}
    expected = {version_outputs(cluster, "v1"): "v1", version_outputs(cluster, "v2"): "v2"}
    shas = {}
    for v in ("v1", "v2"):
        shas[httpx.get(f"{cluster.balancer.url}/v1/adapters/probe-{v}", timeout=10).json()["sha256"]] = v
    urls = [r.url for r in cluster.replicas.values()]
    for round_ in range(4):
        jobs = [(urls[i % len(urls)], files["v1" if (i + round_) % 2 else "v2"]) for i in range(4)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            codes = list(
                pool.map(
                    lambda job: httpx.put(f"{job[0]}/v1/adapters/race", files=job[1], timeout=30).status_code,
                    jobs,
                )
            )
        assert all(code in (200, 201) for code in codes), codes
        sha = httpx.get(f"{urls[0]}/v1/adapters/race", timeout=10).json()["sha256"]
        assert sha in shas, "the stored file is neither upload"
        took = wait_until(cluster, "race", next(o for o, v in expected.items() if v == shas[sha]))
        assert len(took) == len(urls)


@dataclass
class Outcome:
    rid: str
    kind: str
    start: float
    end: float
    ok: bool
    why: str = ""
    thread: int = 0


def one_request(client: httpx.Client, kind: str, adapter_id: str) -> tuple[bool, str, str]:
    rid = uuid.uuid4().hex
    params = {"max_new_tokens": LOAD_NEW_TOKENS, "details": True}
    headers = {"X-Request-Id": rid}
    if kind != "base":
        headers["X-Adapter-Id"] = adapter_id
    body = {"inputs": "Hello", "parameters": params}
    try:
        if kind == "stream":
            events = []
            with client.stream("POST", "/generate_stream", json=body, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    return False, rid, f"HTTP {r.status_code}: {r.text[:200]}"
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
            last = events[-1] if events else {}
            if "error" in last or last.get("generated_text") is None:
                return False, rid, f"stream ended without its final event: {str(last)[:200]}"
            if last["details"]["generated_tokens"] != len(events):
                return False, rid, "stream lost events"
            return True, rid, ""
        r = client.post("/generate", json=body, headers=headers)
        if r.status_code != 200:
            return False, rid, f"HTTP {r.status_code}: {r.text[:200]}"
        if r.json()["details"]["generated_tokens"] < 1:
            return False, rid, "no tokens"
        return True, rid, ""
    except httpx.HTTPError as exc:
        return False, rid, f"{type(exc).__name__}: {exc}"


@DIRECTORY
def test_stopping_one_replica_under_load_fails_no_request(cluster):
    lb = cluster.balancer
    adapter_ids = [f"load-{i}" for i in range(12)]
    home: dict[str, str] = {}
    for adapter_id in adapter_ids:
        r = httpx.put(
            f"{lb.url}/v1/adapters/{adapter_id}", files=upload_files(cluster.adapters["v1"]), timeout=30
        )
        assert r.status_code == 201, r.text
        rid = uuid.uuid4().hex
        r = httpx.post(
            f"{lb.url}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}},
            headers={"X-Adapter-Id": adapter_id, "X-Request-Id": rid},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        home[adapter_id] = rid
    log = lb.requests_log_with(home.values())
    home = {adapter_id: log[rid]["server"] for adapter_id, rid in home.items()}
    # Stop the replica that the most adapters hash to, so that it carries load when it stops.
    victim_name = Counter(home.values()).most_common(1)[0][0]
    victim = cluster.replicas[victim_name]
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    kinds = ("adapter", "base", "stream")

    def worker(index: int) -> None:
        with httpx.Client(base_url=lb.url, timeout=60) as client:
            n = 0
            while not stop.is_set():
                with lock:
                    if len(outcomes) >= LOAD_MAX_REQUESTS:
                        return
                kind = kinds[(index + n) % len(kinds)]
                start = time.monotonic()
                ok, rid, why = one_request(client, kind, adapter_ids[(index + n) % len(adapter_ids)])
                with lock:
                    outcomes.append(Outcome(rid, kind, start, time.monotonic(), ok, why, index))
                n += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(LOAD_THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(SIGTERM_AFTER)
        # Stop the victim while the balancer has requests running on it (waiting for one: bounded).
        in_flight = 0
        poll_until = time.monotonic() + 3
        while time.monotonic() < poll_until:
            in_flight = sum(int(row["scur"] or 0) for row in lb.server_rows(victim_name))
            if in_flight:
                break
            time.sleep(0.02)
        t_sigterm = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        try:
            victim.proc.wait(DRAIN_SECONDS + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{victim_name} did not exit after SIGTERM within the drain:\n{victim.log()}")
        t_exit = time.monotonic()
        # Keep the load on a while after the exit, to see the balancer route around the stopped replica.
        time.sleep(max(AFTER_EXIT_SECONDS, LOAD_SECONDS - (t_exit - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads)
    status = lb.wait_status(victim_name, "DOWN", time.monotonic() + 10)
    log = lb.requests_log_with([o.rid for o in outcomes])

    def server(o: Outcome) -> str:
        return log.get(o.rid, {}).get("server", "?")

    (cluster.workdir / "load-outcomes.json").write_text(
        json.dumps([{**o.__dict__, "start": o.start - t0, "end": o.end - t0} for o in outcomes], indent=1)
    )
    failed = [o for o in outcomes if not o.ok]
    on_victim_at_sigterm = [o for o in outcomes if o.start < t_sigterm < o.end and server(o) == victim_name]
    in_flight_at_sigterm = [o for o in outcomes if o.start < t_sigterm < o.end]
    retried = [o for o in outcomes if log.get(o.rid, {}).get("retries", "0") not in ("0", "+0")]
    after_exit = [o for o in outcomes if o.start > t_exit]
    by_server = Counter(server(o) for o in outcomes)
    print(
        f"\nstop-one-replica: adapters per replica by X-Adapter-Id hash {dict(Counter(home.values()))}"
        f"\n  sent {len(outcomes)} requests through the balancer "
        f"({dict(Counter(o.kind for o in outcomes))}) in {time.monotonic() - t0:.1f} s; "
        f"served by {dict(by_server)}"
        f"\n  SIGTERM to {victim_name} at {t_sigterm - t0:.2f} s with {in_flight} request(s) running on it "
        f"(balancer's count), {len(in_flight_at_sigterm)} in flight in all; it exited after "
        f"{t_exit - t_sigterm:.2f} s with code {victim.proc.returncode}; balancer status now {status}"
        f"\n  requests in flight on {victim_name} at SIGTERM: {len(on_victim_at_sigterm)} "
        f"(failed: {sum(not o.ok for o in on_victim_at_sigterm)})"
        f"\n  retried/redispatched by the balancer: {len(retried)} "
        f"{[(log[o.rid]['server'], log[o.rid]['retries'], log[o.rid]['term']) for o in retried]}"
        f"\n  failed: {len(failed)}"
        + "".join(f"\n    {o.kind} {o.rid} on {server(o)}: {o.why}" for o in failed)
    )
    assert len(outcomes) <= LOAD_MAX_REQUESTS + LOAD_THREADS
    assert by_server[victim_name] > 0, "the victim served nothing: the test did not exercise it"
    unexplained = [o for o in failed if o not in on_victim_at_sigterm]
    assert not unexplained, [(o.kind, server(o), o.why) for o in unexplained]
    # And, as documented for the drain, the requests running on the replica at SIGTERM finished too.
    assert not failed, [(o.kind, server(o), o.why) for o in failed]
    assert victim.proc.returncode in (0, -signal.SIGTERM), victim.proc.returncode
    assert len(after_exit) >= 5, "too little load after the stop to tell"
    assert all(o.ok and server(o) != victim_name for o in after_exit)
    assert status.startswith("DOWN"), status
    # The survivors still serve every adapter.
    for adapter_id in adapter_ids[:2]:
        assert isinstance(outputs(lb.url, adapter_id, header=True), tuple)
