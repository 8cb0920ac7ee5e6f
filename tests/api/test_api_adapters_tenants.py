"""Adapter lifecycle, bad uploads (store unchanged), and tenant isolation over real HTTP."""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from prefixserve.demo import DEMO_MODEL_DIR
from tests.server_process import ServerProcess, upload_files
from tests.tiny_models import make_adapter, peft_generate

pytestmark = pytest.mark.slow  # every test needs a server process (or starts one)

PROMPT = "Once upon a time"
KEYS = {
    "acme": "acme-key-0123456789abcdef",
    "globex": "globex-key-0123456789abcd",
    "ops": "ops-admin-key-0123456789a",
}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle-adapters")
    return [make_adapter(DEMO_MODEL_DIR, root / f"v{i}", 5, "random", seed=10 + i) for i in range(3)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    proc = ServerProcess(["--adapter-dir", str(tmp / "store"), "--max-adapter-mb", "1"], tmp / "server.log")
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def tokens_of(client: httpx.Client, adapter: str, n: int = 8, headers: dict | None = None) -> httpx.Response:
    return client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": n, "details": True}},
        headers=headers,
    )


def ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_lifecycle(server, versions):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        created = c.put("/v1/adapters/story", files=upload_files(versions[0]))
        assert created.status_code == 201
        info = c.get("/v1/adapters/story").json()
        assert info["sha256"] == created.json()["sha256"] and info["loaded"] is False
        assert info["num_virtual_tokens"] == 5 and info["peft_type"] == "PREFIX_TUNING"
        assert ids(tokens_of(c, "story")) == peft_generate(DEMO_MODEL_DIR, versions[0], PROMPT, 8)
        assert c.get("/v1/adapters/story").json()["loaded"] is True

        replaced = c.put("/v1/adapters/story", files=upload_files(versions[1]))
        assert replaced.status_code == 200 and replaced.json()["sha256"] != created.json()["sha256"]
        assert ids(tokens_of(c, "story")) == peft_generate(DEMO_MODEL_DIR, versions[1], PROMPT, 8)

        posted = c.post("/v1/adapters", data={"adapter_id": "second"}, files=upload_files(versions[2]))
        assert posted.status_code == 201
        page1 = c.get("/v1/adapters", params={"limit": 1}).json()
        assert [a["id"] for a in page1["data"]] == ["second"] and page1["next_cursor"] == "second"
        page2 = c.get("/v1/adapters", params={"limit": 1, "after": page1["next_cursor"]}).json()
        assert [a["id"] for a in page2["data"]] == ["story"] and page2["next_cursor"] is None

        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                zf.write(versions[2] / name, f"exported/{name}")
        zipped = c.put(
            "/v1/adapters/zipped", files=[("files", ("exported.zip", archive.getvalue(), "application/zip"))]
        )
        assert zipped.status_code == 201 and zipped.json()["sha256"] == posted.json()["sha256"]

        assert c.delete("/v1/adapters/story").status_code == 204
        assert c.get("/v1/adapters/story").status_code == 404
        gone = tokens_of(c, "story")
        assert gone.status_code == 404 and gone.json()["error_type"] == "adapter_not_found"
        assert c.delete("/v1/adapters/story").status_code == 404


def _bad_uploads(good) -> dict[str, tuple[list, int, str]]:
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()

    def pair(cfg: dict, w: bytes) -> list:
        return [
            ("files", ("adapter_config.json", json.dumps(cfg).encode(), "application/json")),
            ("files", ("adapter_model.safetensors", w, "application/octet-stream")),
        ]

    nan = torch.randn(5, 4 * 2 * 64)
    nan[0, 0] = float("nan")
    return {
        "wrong layers": (pair({**config, "num_layers": 2}, weights), 422, "num_layers is 2"),
        "lora": (pair({**config, "peft_type": "LORA"}, weights), 422, "peft_type is 'LORA'"),
        "nan": (pair(config, save({"prompt_embeddings": nan})), 422, "NaN"),
        "pickle": (
            [("files", ("adapter_model.bin", b"\x80\x04", "application/octet-stream"))],
            422,
            "pickle",
        ),
        "not a zip": ([("files", ("a.zip", b"PK no zip", "application/zip"))], 422, "not a readable archive"),
        "too large": (pair(config, b"\0" * (2 * 2**20)), 413, "limit of 1.0 MB"),
        "one file": (pair(config, weights)[:1], 422, "missing adapter_model.safetensors"),
    }


def test_bad_uploads_get_4xx_and_leave_the_store_unchanged(server, versions):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        good = c.put("/v1/adapters/keeper", files=upload_files(versions[0])).json()
        before = c.get("/v1/adapters").json()
        for what, (files, status, message) in _bad_uploads(versions[0]).items():
            r = c.put("/v1/adapters/keeper", files=files)
            assert r.status_code == status, (what, r.text)
            assert message in r.json()["error"], (what, r.json())
            assert c.put(f"/v1/adapters/new-{status}", files=files).status_code == status
        assert c.get("/v1/adapters").json() == before
        assert c.get("/v1/adapters/keeper").json()["sha256"] == good["sha256"]
        assert ids(tokens_of(c, "keeper")) == peft_generate(DEMO_MODEL_DIR, versions[0], PROMPT, 8)
        bad_id = c.put("/v1/adapters/bad%20id", files=upload_files(versions[0]))
        assert bad_id.status_code == 422 and bad_id.json()["error_type"] == "invalid_adapter_id"


def test_a_damaged_store_over_http(server, versions):
    store = server.log_path.parent / "store" / "default"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # A stored file changed on disk (another adapter's weights under this one's header) is never served.
        assert c.put("/v1/adapters/tampered", files=upload_files(versions[0])).status_code == 201
        c.put("/v1/adapters/donor", files=upload_files(versions[1]))
        header = safe_open(str(store / "tampered.safetensors"), "pt").metadata()
        weights = load_file(str(store / "donor.safetensors"))
        save_file(weights, str(store / "tampered.safetensors"), metadata=header)
        r = tokens_of(c, "tampered")
        assert r.status_code == 422 and r.json()["error_type"] == "adapter_corrupt", r.text
        assert "does not match the sha256 recorded" in r.json()["error"]
        assert "refusing to serve it" in server.log()
        # A corrupted file is replaced by a PUT (no DELETE needed).
        (store / "tampered.safetensors").write_bytes(b"garbage")
        replaced = c.put("/v1/adapters/tampered", files=upload_files(versions[2]))
        assert replaced.status_code == 200, replaced.text
        assert ids(tokens_of(c, "tampered")) == peft_generate(DEMO_MODEL_DIR, versions[2], PROMPT, 8)
        # A directory where a file belongs: skipped in listings, a clear error on its own id.
        (store / "odd.safetensors").mkdir()
        listed = c.get("/v1/adapters")
        assert listed.status_code == 200 and "odd" not in [a["id"] for a in listed.json()["data"]]
        assert c.get("/v1/adapters/odd").status_code == 422
        r = c.put("/v1/adapters/odd", files=upload_files(versions[0]))
        assert r.status_code == 503 and "holds a directory" in r.json()["error"]
        assert c.get("/v1/models").status_code == 200
        assert ids(tokens_of(c, "tampered")) == peft_generate(DEMO_MODEL_DIR, versions[2], PROMPT, 8)


def test_concurrent_puts_of_one_id(server, versions):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sha = [
            c.put(f"/v1/adapters/ref-{i}", files=upload_files(v)).json()["sha256"]
            for i, v in enumerate(versions)
        ]

        def put(args):
            round_, i = args
            return i, c.put(f"/v1/adapters/race-{round_}", files=upload_files(versions[i % 3]))

        with ThreadPoolExecutor(20) as pool:
            for round_ in range(5):
                answers = list(pool.map(put, [(round_, i) for i in range(20)]))
                assert all(r.status_code in (200, 201) for _, r in answers), [r.text for _, r in answers]
                assert sum(r.status_code == 201 for _, r in answers) == 1
                assert all(r.json()["sha256"] == sha[i % 3] for i, r in answers)  # its own version, each
                assert c.get(f"/v1/adapters/race-{round_}").json()["sha256"] in sha


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": KEYS["acme"], "tenant": "acme"},
                    {
                        "key_sha256": __import__("hashlib").sha256(KEYS["globex"].encode()).hexdigest(),
                        "tenant": "globex",
                    },
                    {"key": KEYS["ops"], "tenant": "ops", "admin": True},
                ]
            }
        )
    )
    proc = ServerProcess(
        ["--adapter-dir", str(tmp / "store"), "--api-keys-file", str(keys)], tmp / "server.log"
    )
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def test_tenants_cannot_see_each_other(keyed_server, versions):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        assert (
            c.put("/v1/adapters/support", files=upload_files(versions[0]), headers=auth("acme")).status_code
            == 201
        )
        assert (
            c.put("/v1/adapters/support", files=upload_files(versions[1]), headers=auth("globex")).status_code
            == 201
        )
        assert (
            c.put("/v1/adapters/acme-only", files=upload_files(versions[2]), headers=auth("acme")).status_code
            == 201
        )
        # Same id, own version each.
        assert ids(tokens_of(c, "support", headers=auth("acme"))) == peft_generate(
            DEMO_MODEL_DIR, versions[0], PROMPT, 8
        )
        assert ids(tokens_of(c, "support", headers=auth("globex"))) == peft_generate(
            DEMO_MODEL_DIR, versions[1], PROMPT, 8
        )
        # Another tenant's adapter is a 404 on every endpoint, never a 403.
        g = auth("globex")
        assert tokens_of(c, "acme-only", headers=g).status_code == 404
        assert (
            c.post(
                "/generate_stream",
                json={"inputs": PROMPT, "parameters": {"adapter_id": "acme-only"}},
                headers=g,
            ).status_code
            == 404
        )
        assert (
            c.post("/v1/completions", json={"model": "acme-only", "prompt": PROMPT}, headers=g).status_code
            == 404
        )
        assert (
            c.post(
                "/v1/chat/completions",
                json={"model": "acme-only", "messages": [{"role": "user", "content": "x"}]},
                headers=g,
            ).status_code
            == 404
        )
        assert c.get("/v1/adapters/acme-only", headers=g).status_code == 404
        assert c.delete("/v1/adapters/acme-only", headers=g).status_code == 404
        assert [a["id"] for a in c.get("/v1/adapters", headers=g).json()["data"]] == ["support"]
        assert "acme-only" not in [m["id"] for m in c.get("/v1/models", headers=g).json()["data"]]
        assert c.get("/v1/adapters/acme-only", headers=auth("acme")).status_code == 200  # delete did nothing
        # Keys.
        assert c.get("/v1/adapters").status_code == 401
        assert (
            c.get("/v1/adapters", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        )
        assert c.post("/generate", json={"inputs": PROMPT}).status_code == 401
        assert c.post("/", json={"inputs": PROMPT}).status_code == 401  # TGI's route; GET / is the console
        assert c.get("/").headers["location"] == "/console/"
        for page in (
            "/console/",
            "/console/console.js",
            "/docs",
            "/openapi.json",
            "/static-offline-docs/swagger-ui.css",
        ):
            assert c.get(page).status_code == 200, page  # pages with no data in them need no key
        assert c.post("/console/", json={}).status_code == 401 and c.get("/consoles").status_code == 401
        assert c.get("/v1/adapters", headers={**g, "X-Tenant": "acme"}).status_code == 403
        # An admin key manages any tenant.
        as_acme = {**auth("ops"), "X-Tenant": "acme"}
        assert {a["id"] for a in c.get("/v1/adapters", headers=as_acme).json()["data"]} == {
            "support",
            "acme-only",
        }
        assert c.delete("/v1/adapters/acme-only", headers=as_acme).status_code == 204
        assert c.get("/v1/adapters/acme-only", headers=auth("acme")).status_code == 404
        # Operations stay open.
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        # Metrics stay open for Prometheus, but never name a tenant's adapters.
        metrics_text = c.get("/metrics").text
        assert "prefixserve_adapter_requests_info" in metrics_text
        assert "acme" not in metrics_text and "support" not in metrics_text


@pytest.mark.parametrize(
    ("args", "env", "where"),
    [
        (["--host", "0.0.0.0"], {}, "0.0.0.0"),
        (["--host", ""], {}, "every interface"),  # an empty host binds every interface
        ([], {"PREFIXSERVE_HOST": ""}, "every interface"),
    ],
)
def test_non_loopback_without_keys_is_refused(tmp_path, args, env, where):
    proc = ServerProcess([*args, "--adapter-dir", str(tmp_path / "s")], tmp_path / "log", env=env)
    try:
        assert proc.proc.wait(60) == 2
        assert f"refusing to serve {where}" in proc.log() and "without API keys" in proc.log()
    finally:
        proc.stop()
