"""The app in this process, where faults can be injected: storage faults over the API (a full store is 507, a
read-only one 503, both with a message; generation with stored adapters goes on meanwhile), and the periodic
sweep of temp files left by crashed uploads."""

from __future__ import annotations

import asyncio
import errno
import os
import time

import httpx
import pytest

from prefixserve.adapters import store_dir as store_module
from prefixserve.api import app as app_module
from prefixserve.api.app import create_app
from prefixserve.config import Settings
from prefixserve.runtime import build_runtime
from tests.server_process import upload_files
from tests.tiny_models import make_adapter

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    runtime = build_runtime(Settings(adapter_dir=tmp / "store", dtype="float32"))
    runtime.engine.start()
    try:
        yield create_app(runtime, start_engine=False)
    finally:
        runtime.engine.stop_accepting()
        runtime.engine.join(10)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from prefixserve.demo import DEMO_MODEL_DIR

    return make_adapter(DEMO_MODEL_DIR, tmp_path_factory.mktemp("a") / "a", 4, "random")


@pytest.mark.parametrize(
    ("code", "status", "error_type", "message"),
    [
        (errno.ENOSPC, 507, "store_full", "the adapter store is full"),
        (errno.EROFS, 503, "store_unavailable", "read-only"),
    ],
)
async def test_storage_faults_have_their_status(app, adapter, monkeypatch, code, status, error_type, message):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
        assert (await c.put("/v1/adapters/kept", files=upload_files(adapter))).status_code in (200, 201)

        def fail(*args):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fail)
        r = await c.put("/v1/adapters/kept", files=upload_files(adapter))
        assert r.status_code == status and r.json()["error_type"] == error_type, r.text
        assert message in r.json()["error"] and "/" not in r.json()["error"].split(":")[-1]  # no server path
        body = {"inputs": "Hi", "parameters": {"adapter_id": "kept", "max_new_tokens": 3}}
        assert (await c.post("/generate", json=body)).status_code == 200  # the stored adapter still serves
        assert [a["id"] for a in (await c.get("/v1/adapters")).json()["data"]] == ["kept"]


async def test_stale_temp_files_are_swept_while_serving(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "TEMP_SWEEP_SECONDS", 0.01)
    runtime = build_runtime(Settings(adapter_dir=tmp_path / "store", dtype="float32"))
    app = create_app(runtime, start_engine=False)
    (tmp_path / "store" / "acme").mkdir()
    stale, young = tmp_path / "store" / "acme" / ".tmp-a-1", tmp_path / "store" / "acme" / ".tmp-b-2"
    async with app.router.lifespan_context(app):
        for path in (stale, young):  # left by a crash after this server started
            path.write_bytes(b"partial")
        old = time.time() - store_module.STALE_TEMP_SECONDS - 1
        os.utime(stale, (old, old))
        for _ in range(1000):
            if not stale.exists():
                break
            await asyncio.sleep(0.01)
        assert not stale.exists()
        assert young.exists()  # may be another replica's upload in progress


def test_the_openapi_schema_documents_errors_and_the_bearer_scheme(app):
    spec = app.openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from the server's keys file, when it has one.",
    }
    for path, method in (
        ("/generate", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/adapters/{adapter_id}", "put"),
    ):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"HTTPBearer": []}], path
        assert {"400", "401", "404", "413", "422", "503"} <= set(operation["responses"]), path
    assert {"415", "507", "200", "201"} <= set(spec["paths"]["/v1/adapters/{adapter_id}"]["put"]["responses"])
    assert {"429", "424"} <= set(spec["paths"]["/generate"]["post"]["responses"])
    error = spec["paths"]["/v1/completions"]["post"]["responses"]["429"]["content"]["application/json"][
        "schema"
    ]
    assert error == {"$ref": "#/components/schemas/OpenAIErrorBody"}
    assert "text/event-stream" in spec["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
    assert "security" not in spec["paths"]["/health"]["get"]
