"""The S3 adapter store against a real SeaweedFS on loopback (the `s3_server` fixture): what only a bucket
does. The promises both backends share are checked on both in tests/unit/test_store_registry.py.

Requests are counted with botocore's own event hooks on the store's real client (nothing is mocked):
listing pages, header reads (ranged GETs), HEADs.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

from prefixserve.adapters.archive import read_upload
from prefixserve.adapters.errors import AdapterNotFoundError, StoreError
from prefixserve.adapters.locations import S3Location, parse_store_location
from prefixserve.adapters.s3_client import make_client
from prefixserve.adapters.store_s3 import HEADER_PROBE_BYTES, S3Store
from prefixserve.adapters.stores import open_store
from prefixserve.config import Settings
from tests.api.test_cli_startup import run_cli
from tests.s3_server import S3Server
from tests.server_process import free_port
from tests.unit.test_adapter_format import LIMIT, peft_files, prompt_files
from tests.unit.test_store_registry import adapter


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch) -> S3Server:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def location(s3_bucket: str) -> S3Location:
    return S3Location.parse(f"s3://{s3_bucket}/s3-tests/{uuid.uuid4().hex[:12]}")


def record_calls(store: S3Store) -> tuple[Counter, list[dict]]:
    """Counts of the S3 operations `store` calls from now on, and the parameters of each GetObject."""
    calls: Counter = Counter()
    gets: list[dict] = []

    def record(model, params, **kwargs) -> None:
        calls[model.name] += 1
        if model.name == "GetObject":
            gets.append(params)

    store.client.meta.events.register("before-parameter-build.s3", record)
    return calls, gets


def test_listing_pages_through_the_bucket_sorted_by_id_and_reads_each_header_once(aws_env, location):
    writer = S3Store(location)
    ids = ["b", "a-b", "a.b", "a", "a_b", "Z", "0"]  # key order ('a-b.' < 'a.' < 'a_') is not id order
    for adapter_id in ids:
        writer.put("acme", adapter_id, adapter(3))
    writer.put("globex", "x", adapter())
    reader = S3Store(location, page_size=2)  # another replica, nothing cached, two keys a page
    calls, gets = record_calls(reader)
    listed = reader.list("acme")
    assert [i.adapter_id for i in listed] == sorted(ids)
    assert calls == {"ListObjectsV2": 4, "GetObject": 7}, calls  # 7 keys in pages of 2; one header each
    assert {g["Range"] for g in gets} == {f"bytes=0-{HEADER_PROBE_BYTES - 1}"}  # headers only
    assert all(i.num_virtual_tokens == 3 and len(i.sha256) == 64 for i in listed)

    calls.clear()
    assert reader.list("acme") == listed
    assert calls == {"ListObjectsV2": 4}, calls  # same versions (ETags): no header read again
    writer.put("acme", "b", adapter(4))
    writer.delete("acme", "0")
    calls.clear()
    relisted = reader.list("acme")
    assert [i.adapter_id for i in relisted] == sorted(set(ids) - {"0"})
    assert next(i for i in relisted if i.adapter_id == "b").num_virtual_tokens == 4
    assert calls == {"ListObjectsV2": 3, "GetObject": 1}, calls  # only the replaced one's header
    assert [i.adapter_id for i in reader.list("globex")] == ["x"]
    assert reader.list("initech") == []


def test_fingerprint_is_the_etag_from_one_head_and_follows_other_replicas(aws_env, location, s3_server):
    replica_a, replica_b = S3Store(location), S3Store(location)
    replica_a.put("default", "a", adapter())
    _, _, loaded_version = replica_b.load("default", "a")
    key = replica_b.key("default", "a")
    etag = s3_server.client().head_object(Bucket=location.bucket, Key=key)["ETag"]
    calls, _ = record_calls(replica_b)
    assert replica_b.fingerprint("default", "a") == loaded_version == etag
    assert calls == {"HeadObject": 1}  # a refresh check reads nothing of the adapter
    replica_a.put("default", "a", adapter())
    assert replica_b.fingerprint("default", "a") not in (None, etag)
    replica_a.delete("default", "a")
    assert replica_b.fingerprint("default", "a") is None


def test_info_reads_the_header_only_even_a_long_one(aws_env, location):
    store = S3Store(location)
    store.put("default", "big", big := adapter(64))  # 32 KB of weights
    calls, gets = record_calls(store)
    info = store.info("default", "big")
    assert calls == {"GetObject": 1} and gets[0]["Range"] == f"bytes=0-{HEADER_PROBE_BYTES - 1}"
    assert info.size_bytes > 2 * HEADER_PROBE_BYTES and info.num_virtual_tokens == 64
    loaded, loaded_info, _ = store.load("default", "big")
    assert loaded_info == info and torch.equal(loaded.embeddings, big.embeddings)

    # A header longer than the first read (a long config): the rest, from the same version (If-Match).
    long_config = peft_files(t=3, base_model_name_or_path="m" * (2 * HEADER_PROBE_BYTES))
    store.put("default", "long", read_upload(list(long_config.items()), LIMIT))
    calls.clear()
    gets.clear()
    info = store.info("default", "long")
    assert info.config["base_model_name_or_path"] == "m" * (2 * HEADER_PROBE_BYTES)
    assert calls == {"GetObject": 2} and "IfMatch" in gets[1]


def test_prompt_learning_adapters_round_trip_through_the_bucket(aws_env, location):
    store, replica = S3Store(location), S3Store(location)
    for adapter_id, files in {
        "prompt": prompt_files(t=4),
        "ptuning": prompt_files(t=6, peft_type="P_TUNING", encoder_reparameterization_type="LSTM"),
    }.items():
        sent = read_upload(list(files.items()), LIMIT)
        store.put("default", adapter_id, sent)
        loaded, info, _ = replica.load("default", adapter_id)
        assert loaded.method == sent.method and loaded.config == sent.config
        assert torch.equal(loaded.embeddings, sent.embeddings) and info.peft_type == sent.peft_type
    listed = {i.adapter_id: i.peft_type for i in replica.list("default")}
    assert (listed["prompt"], listed["ptuning"]) == ("PROMPT_TUNING", "P_TUNING")


def test_a_body_damaged_on_the_way_is_refused_and_the_old_version_stays(aws_env, location):
    store = S3Store(location)
    old, _ = store.put("default", "a", adapter())

    def flip_last_byte(request, **kwargs) -> None:  # after the checksum was computed, before it is sent
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        request.body = body[:-1] + bytes([body[-1] ^ 1])

    store.client.meta.events.register("before-send.s3.PutObject", flip_last_byte)
    with pytest.raises(StoreError, match=r"cannot store adapter 'a': the S3 service failed \(BadDigest"):
        store.put("default", "a", adapter())
    with pytest.raises(StoreError, match="BadDigest"):
        store.put("default", "new", adapter())
    store.client.meta.events.unregister("before-send.s3.PutObject", flip_last_byte)
    assert store.load("default", "a")[1].sha256 == old.sha256
    with pytest.raises(AdapterNotFoundError):
        store.info("default", "new")


def test_an_unreachable_endpoint_is_a_store_error_that_says_what_to_check(aws_env, location, monkeypatch):
    store = S3Store(location)
    store.put("default", "a", adapter())
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the bounded retries are botocore's; one try is enough here
    with pytest.raises(StoreError, match=r"the S3 endpoint http://127\.0\.0\.1:\d+ cannot be reached"):
        open_store(location)
    store.client = make_client()  # the endpoint gone while serving
    for action in (store.load, store.info, store.fingerprint, store.delete, store.list, store.put):
        args = ("default",) if action == store.list else ("default", "a")
        if action == store.put:
            args = ("default", "a", adapter())
        with pytest.raises(StoreError) as caught:
            action(*args)
        message = str(caught.value)
        assert "cannot be reached" in message and "check AWS_ENDPOINT_URL" in message, message


def test_wrong_credentials_are_refused_without_showing_them(aws_env, location, monkeypatch):
    store = S3Store(location)
    store.put("default", "a", adapter())
    wrong = "not-the-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StoreError, match="denies access") as caught:
        open_store(location)
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value) and wrong not in str(caught.value)
    store.client = make_client()  # as if the key had been revoked while serving
    with pytest.raises(StoreError, match=r"cannot read adapter 'a': the S3 service denies access"):
        store.load("default", "a")


def test_a_missing_bucket_fails_the_store_and_the_start_up(aws_env, tmp_path):
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/adapters"
    with pytest.raises(StoreError, match="does not exist .*create it"):
        open_store(missing)
    # The server refuses to start, in one line, before importing torch and loading the model.
    result, torch_imported = run_cli(tmp_path, "serve", "--adapter-dir", missing, "--port", str(free_port()))
    output = result.stdout + result.stderr
    assert result.returncode == 2 and not torch_imported
    bucket = missing.split("/")[2]
    assert output.splitlines() == [
        f"prefixserve: --adapter-dir {missing}: the bucket '{bucket}' does not exist at {aws_env.endpoint}: "
        f"create it (e.g. aws s3 mb s3://{bucket}), or correct --adapter-dir"
    ]


def test_an_unreachable_endpoint_at_start_up_is_one_line(aws_env, location, tmp_path):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    result, torch_imported = run_cli(
        tmp_path, "serve", "--adapter-dir", location, "--port", str(free_port()), env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and not torch_imported
    assert len(output.splitlines()) == 1 and "cannot be reached" in output, output


def test_adapter_dir_takes_an_s3_url_or_a_path(tmp_path, monkeypatch):
    settings = Settings(_cli_parse_args=["--adapter-dir", "s3://my-bucket/team/adapters/"])
    assert isinstance(settings.adapter_dir, S3Location)
    assert settings.adapter_dir == "s3://my-bucket/team/adapters/"  # not collapsed to s3:/ as a Path would
    assert (settings.adapter_dir.bucket, settings.adapter_dir.prefix) == ("my-bucket", "team/adapters/")
    assert S3Location.parse("s3://my-bucket").prefix == ""
    monkeypatch.setenv("PREFIXSERVE_ADAPTER_DIR", "s3://env-bucket/p")
    assert Settings().adapter_dir.bucket == "env-bucket"
    monkeypatch.setenv("PREFIXSERVE_ADAPTER_DIR", "relative/store")
    assert Settings().adapter_dir == parse_store_location("relative/store") == Path("relative/store")
    for bad, why in (
        ("s3://", "bucket name ''"),
        ("s3://B_ad/x", "bucket name 'B_ad'"),
        ("s3://ok1/a//b", "prefix"),
    ):
        result, _ = run_cli(tmp_path, "serve", "--adapter-dir", bad)
        assert result.returncode == 2 and "invalid configuration: --adapter-dir" in result.stderr
        assert why in result.stderr and "write s3://BUCKET or s3://BUCKET/PREFIX" in result.stderr
