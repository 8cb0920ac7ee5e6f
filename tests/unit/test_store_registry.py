"""The durable store (atomic, hashed) and the registry (LRU by bytes, refresh, composition).

The store's promises are checked on both backends (`backend`: a directory, and a bucket of a real
SeaweedFS on loopback); what only a file system can do (crashes mid-rename, fsync faults, a directory in
the way) on the directory store. S3-only behaviour: tests/system/test_store_s3.py."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prefixserve import metrics
from prefixserve.adapters.archive import read_upload
from prefixserve.adapters.errors import (
    AdapterIntegrityError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    StoreError,
    StoreFullError,
)
from prefixserve.adapters.format import PeftAdapter
from prefixserve.adapters.kv_prefix import embeddings_to_kv
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store import AdapterStore
from prefixserve.adapters.store_dir import DirectoryStore
from prefixserve.adapters.store_format import (
    content_sha256,
    decode_verified,
    encode_adapter,
    header_length,
    header_metadata,
    read_header,
    stored_content_sha256,
    stored_tensor_view,
)
from prefixserve.adapters.stores import open_store
from tests.s3_server import S3Server
from tests.unit.test_adapter_format import LIMIT, SHAPE, peft_files


def adapter(t: int = 5):
    return read_upload(list(peft_files(t=t).items()), LIMIT)


def registry(
    store: AdapterStore | Path, cache_bytes: int = 2**20, refresh: float = 0.0, max_t: int = 64
) -> AdapterRegistry:
    store = DirectoryStore(store) if isinstance(store, Path) else store
    return AdapterRegistry(store, SHAPE, torch.float32, torch.device("cpu"), cache_bytes, max_t, refresh)


@dataclass
class Backend:
    """A store location, and raw access to a stored adapter's bytes behind the store's back."""

    kind: str
    location: str
    read_raw: Callable[[str, str], bytes]
    write_raw: Callable[[str, str, bytes], None]

    def open(self) -> AdapterStore:
        """A store at the location: each call another instance, as another replica would open it."""
        return open_store(self.location)


@pytest.fixture(params=["directory", pytest.param("s3", marks=[pytest.mark.external, pytest.mark.slow])])
def backend(request, tmp_path, monkeypatch) -> Backend:
    if request.param == "directory":

        def file(namespace: str, adapter_id: str) -> Path:
            return tmp_path / namespace / f"{adapter_id}.safetensors"

        def write_file(namespace: str, adapter_id: str, data: bytes) -> None:
            file(namespace, adapter_id).parent.mkdir(parents=True, exist_ok=True)
            file(namespace, adapter_id).write_bytes(data)

        return Backend("directory", str(tmp_path), lambda ns, i: file(ns, i).read_bytes(), write_file)
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    prefix = f"stores/{uuid.uuid4().hex[:12]}"
    client = server.client()

    def read_object(namespace: str, adapter_id: str) -> bytes:
        key = f"{prefix}/{namespace}/{adapter_id}.safetensors"
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def write_object(namespace: str, adapter_id: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{namespace}/{adapter_id}.safetensors", Body=data)

    return Backend("s3", f"s3://{bucket}/{prefix}", read_object, write_object)


def test_put_get_roundtrip_with_hash_and_times(backend):
    store = backend.open()
    a = adapter()
    info, created = store.put("default", "support", a)
    assert created and len(info.sha256) == 64 and info.size_bytes > 0
    loaded, info2, _ = store.load("default", "support")
    assert torch.equal(loaded.embeddings, a.embeddings) and info2.sha256 == info.sha256
    info3, created = store.put("default", "support", a)
    assert not created and info3.sha256 == info.sha256 and info3.created_at == info.created_at
    b = adapter()
    info4, _ = store.put("default", "support", b)
    assert info4.sha256 != info.sha256
    assert [i.adapter_id for i in store.list("default")] == ["support"]
    listed = store.list("default")[0]
    assert (listed.sha256, listed.created_at, listed.size_bytes) == (
        info4.sha256,
        info.created_at,
        info4.size_bytes,
    )
    assert store.info("default", "support") == listed
    assert info4.updated_at >= info.updated_at and abs(info4.updated_at - time.time()) < 60


def test_namespaces_are_separate(backend):
    store = backend.open()
    store.put("acme", "support", adapter())
    with pytest.raises(AdapterNotFoundError):
        store.info("globex", "support")
    assert store.list("globex") == []


def test_invalid_ids_are_refused(backend):
    store = backend.open()
    for bad in ("../x", "", "a/b", ".hidden", "x" * 129):
        with pytest.raises(InvalidAdapterIdError):
            store.put("default", bad, adapter())
        with pytest.raises(InvalidAdapterIdError):
            store.load("default", bad)
        with pytest.raises(InvalidAdapterIdError):
            store.put(bad, "a", adapter())
    with pytest.raises(InvalidAdapterIdError):
        store.list("../x")


def test_deleting_a_missing_adapter_is_not_found(backend):
    store = backend.open()
    store.put("default", "a", adapter())
    store.delete("default", "a")
    assert store.list("default") == [] and store.fingerprint("default", "a") is None
    for action in (store.delete, store.info, store.load):
        with pytest.raises(AdapterNotFoundError):
            action("default", "a")


def test_a_crash_mid_write_leaves_the_old_version(tmp_path, monkeypatch):
    store = DirectoryStore(tmp_path)
    old, _ = store.put("default", "a", adapter())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="the adapter store failed"):
        store.put("default", "a", adapter())
    monkeypatch.undo()
    assert store.info("default", "a").sha256 == old.sha256
    assert not list((tmp_path / "default").glob(".tmp-*")), "temp file left behind"


def test_concurrent_writers_leave_one_complete_version(backend):
    store = backend.open()
    versions = [adapter() for _ in range(6)]
    threads = [threading.Thread(target=store.put, args=("default", "same", v)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded, info, _ = store.load("default", "same")
    assert any(torch.equal(loaded.embeddings, v.embeddings) for v in versions)


def test_lru_evicts_by_bytes_and_counts(tmp_path):
    reg = registry(tmp_path, cache_bytes=SHAPE.token_width * 4 * 10)  # room for T=10 of float32
    for name, t in (("a", 5), ("b", 4), ("c", 3)):
        reg.put("default", name, adapter(t))
    evictions = metrics.ADAPTER_CACHE_EVICTIONS.labels("prefix-tuning")._value.get()
    reg.get("default", ("a",))
    reg.get("default", ("b",))
    assert reg.is_loaded("default", "a") and reg.is_loaded("default", "b")
    reg.get("default", ("a",))  # a is now most recent
    reg.get("default", ("c",))  # 5+4+3 > 10: evicts b, the least recently used
    assert reg.is_loaded("default", "a") and not reg.is_loaded("default", "b")
    assert metrics.ADAPTER_CACHE_EVICTIONS.labels("prefix-tuning")._value.get() == evictions + 1


def test_the_loaded_gauge_follows_loads_evictions_replacements_and_deletes(tmp_path):
    """prefixserve_adapters_loaded is kept as a running count (walking the cache cost every load time in
    proportion to the adapters cached); through random loads, compositions, uploads and deletes it equals
    the single adapters the cache holds."""
    rng = random.Random(0)
    reg = registry(tmp_path, cache_bytes=SHAPE.token_width * 4 * 16)  # room for a few adapters of T=1..5
    names = [f"a{i}" for i in range(8)]
    for name in names:
        reg.put("default", name, adapter(rng.randrange(1, 6)))
    gauge = metrics.ADAPTERS_LOADED.labels("prefix-tuning")
    for _ in range(300):
        op, name = rng.random(), rng.choice(names)
        if op < 0.6:
            reg.get("default", (name,))
        elif op < 0.75:
            reg.get("default", (name, rng.choice(names)))
        elif op < 0.9:
            reg.put("default", name, adapter(rng.randrange(1, 6)))
        else:
            reg.delete("default", name)
            reg.put("default", name, adapter(rng.randrange(1, 6)))
        assert gauge._value.get() == sum(1 for key in reg._cache if len(key[1]) == 1)
    reg.get("default", ("a0",))
    reg._insert(("default", ("a0",)), reg._cache[("default", ("a0",))])  # an entry replaced in place
    assert gauge._value.get() == sum(1 for key in reg._cache if len(key[1]) == 1)


def test_replacement_by_another_replica_is_seen_within_the_refresh_time(backend):
    # The window is wide enough for the other replica's put to S3 on a loaded 2-core machine (0.2 s was not)
    reg = registry(backend.open(), refresh=1.0)
    other_replica = backend.open()
    reg.put("default", "a", adapter())
    old = reg.get("default", ("a",))
    other_replica.put("default", "a", adapter())
    assert reg.get("default", ("a",)) is old  # within the refresh window the cached version may serve
    time.sleep(1.05)
    assert reg.get("default", ("a",)).sha256 != old.sha256
    other_replica.delete("default", "a")
    time.sleep(1.05)
    with pytest.raises(AdapterNotFoundError):
        reg.get("default", ("a",))


def test_composition_concatenates_in_order_and_is_bounded(tmp_path):
    reg = registry(tmp_path, max_t=8)
    a, b = adapter(3), adapter(4)
    reg.put("default", "a", a)
    reg.put("default", "b", b)
    ab = reg.get("default", ("a", "b"))
    assert ab.num_virtual_tokens == 7 and ab.name == "a+b"
    expected = embeddings_to_kv(torch.cat([a.embeddings, b.embeddings]), SHAPE)
    assert torch.equal(ab.kv, expected)
    with pytest.raises(InvalidAdapterError, match="above this server's limit of 8"):
        reg.get("default", ("a", "b", "a"))
    reg.put("default", "b", adapter(4))  # a replaced part invalidates the composition
    assert reg.get("default", ("a", "b")).sha256 != ab.sha256


def test_missing_adapter(backend):
    with pytest.raises(AdapterNotFoundError, match="PUT /v1/adapters/nope"):
        registry(backend.open()).get("default", ("nope",))


def test_a_file_changed_in_the_store_is_never_served(backend, caplog):
    reg = registry(backend.open())
    reg.put("default", "a", adapter())
    reg.put("default", "b", other := adapter())
    metadata = backend.open().info("default", "a")
    header = header_metadata(backend.read_raw("default", "a"))  # a's header (id, sha256) kept, b's weights in
    tampered = save_safetensors({"prompt_embeddings": other.embeddings}, metadata=header)
    backend.write_raw("default", "a", tampered)
    with pytest.raises(AdapterIntegrityError, match=f"does not match the sha256 recorded.*{metadata.sha256}"):
        reg.get("default", ("a",))
    assert "refusing to serve it" in caplog.text
    assert torch.equal(
        load_safetensors(backend.read_raw("default", "a"))["prompt_embeddings"], other.embeddings
    )
    assert reg.get("default", ("b",)).num_virtual_tokens == 5  # other adapters unaffected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_content_hash_is_read_where_the_tensor_lies(dtype):
    """A load hashes the stored tensor in place (stored_content_sha256) and gets the recorded hash, whatever
    the config holds (non-ASCII text, quotes, backslashes, control characters); one byte changed, it does not."""
    config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": 3,
        "note": 'ünïcode "q" \\ / \n\t \u0001 😀',
    }
    data, sha256 = encode_adapter(PeftAdapter(config, torch.randn(3, 40).to(dtype)), 1.0)
    config_json = header_metadata(data)["adapter_config"]
    assert (
        stored_content_sha256(data, *read_header(data), config_json)
        == sha256
        == content_sha256({"prompt_embeddings": load_safetensors(data)["prompt_embeddings"]}, config_json)
    )
    changed = bytearray(data)
    changed[-1] ^= 1
    assert stored_content_sha256(bytes(changed), *read_header(data), config_json) != sha256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_load_reads_the_stored_tensor_in_place_and_only_from_its_own_layout(dtype):
    """stored_tensor_view: the tensor as stored, without a copy, for the one layout encode_adapter writes;
    None (safetensors then parses it, or says what is wrong) for any other."""
    embeddings = torch.randn(3, 40).to(dtype)
    data, _ = encode_adapter(
        PeftAdapter({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}, embeddings), 1.0
    )
    view = stored_tensor_view(data, *read_header(data))
    assert view is not None and view.dtype == dtype and torch.equal(view, embeddings)
    assert view.untyped_storage().data_ptr() - 8 - header_length(data) == _address_of(data)  # in place
    other_layouts = [
        save_safetensors({"prompt_embeddings": embeddings, "extra": torch.zeros(1)}),
        save_safetensors({"prompt_embeddings": embeddings.reshape(3, 4, 10)}),
        save_safetensors({"prompt_embeddings": embeddings.to(torch.int32)}),
        save_safetensors({"other_name": embeddings}),
        data[:-1],
        data + b"\0",
    ]
    assert all(stored_tensor_view(d, *read_header(d)) is None for d in other_layouts)


def _with_header(data: bytes, edit) -> bytes:
    """`data` with its safetensors header JSON passed through `edit` (bytes -> bytes), re-padded."""
    n = header_length(data)
    header = edit(data[8 : 8 + n])
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.replace(b'"data_offsets":[0,', b'"data_offsets":[0.0,'),  # a float that equals an int
        lambda h: h.replace(b'"data_offsets":[0,', b'"data_offsets":[8,'),  # past the tensor's bytes
        lambda h: b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the JSON parser
        lambda h: h.replace(b'"shape":[5,', b'"shape":[5.0,'),
    ],
    ids=["float-offset", "offset-past-data", "deep-nesting", "float-shape"],
)
def test_a_crafted_stored_header_is_unreadable_never_a_crash(edit):
    """A stored file whose header was tampered with is refused with the store's "unreadable, upload it again"
    error (InvalidAdapterError), not an exception of another kind out of the load path."""
    data, _ = encode_adapter(adapter(t=5), 1.0)
    decode_verified("default", "a", data, "test", 1.0)  # as stored: served
    assert b'"data_offsets":[0,' in data and b'"shape":[5,' in data
    with pytest.raises(InvalidAdapterError, match="unreadable|does not match"):
        decode_verified("default", "a", _with_header(data, edit), "test", 1.0)


def _address_of(data: bytes) -> int:
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


def test_unreadable_entries_are_skipped_in_listings(backend):
    store = backend.open()
    store.put("default", "a", adapter())
    backend.write_raw("default", "junk", b"not a safetensors file")
    backend.write_raw("default", "empty", b"")
    assert [i.adapter_id for i in store.list("default")] == ["a"]
    for bad in ("junk", "empty"):
        with pytest.raises(InvalidAdapterError, match="unreadable"):
            store.info("default", bad)
        with pytest.raises(InvalidAdapterError, match="unreadable"):
            store.load("default", bad)


def test_a_corrupted_stored_file_is_replaced_by_a_put(backend):
    reg = registry(backend.open())
    old, _ = reg.put("default", "a", adapter())
    backend.write_raw("default", "a", b"garbage")
    with pytest.raises(InvalidAdapterError, match="unreadable"):
        reg.get("default", ("a",))
    info, created = reg.put("default", "a", new := adapter())
    assert not created and info.sha256 != old.sha256
    assert torch.equal(reg.store.load("default", "a")[0].embeddings, new.embeddings)


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (errno.ENOSPC, StoreFullError, "the adapter store is full"),
        (errno.EDQUOT, StoreFullError, "the adapter store is full"),
        (errno.EROFS, StoreError, "read-only"),
        (errno.EACCES, StoreError, "read-only or not writable"),
        (errno.EIO, StoreError, "the adapter store failed"),
    ],
)
def test_storage_faults_are_typed_and_keep_the_old_version(tmp_path, monkeypatch, code, error, message):
    store = DirectoryStore(tmp_path)
    old, _ = store.put("default", "a", adapter())

    def fail(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(error, match=message):
        store.put("default", "a", adapter())
    with pytest.raises(error, match=message):
        store.put("other-tenant", "new", adapter())
    monkeypatch.undo()
    assert store.load("default", "a")[1].sha256 == old.sha256
    assert not list(tmp_path.glob("*/.tmp-*")), "temp file left behind"


def test_a_directory_in_the_store_is_skipped(tmp_path):
    store = DirectoryStore(tmp_path)
    store.put("default", "a", adapter())
    (tmp_path / "default" / "x.safetensors").mkdir()
    assert [i.adapter_id for i in store.list("default")] == ["a"]
    with pytest.raises(InvalidAdapterError, match="not a file"):
        store.info("default", "x")
    with pytest.raises(InvalidAdapterError, match="not a file"):
        store.load("default", "x")
    with pytest.raises(StoreError, match="holds a directory where its file belongs"):
        store.put("default", "x", adapter())
    with pytest.raises(StoreError, match="holds a directory"):
        store.delete("default", "x")
    assert store.load("default", "a")[0].num_virtual_tokens == 5


def _put_at_once(reg: AdapterRegistry, adapter_id: str, versions: list) -> list:
    """Every version stored by its own thread, all released at the same moment."""
    barrier = threading.Barrier(len(versions))
    results: list = [None] * len(versions)

    def put(i: int) -> None:
        barrier.wait()
        results[i] = reg.put("default", adapter_id, versions[i])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(versions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_puts_of_one_id_each_describe_their_own_version(backend):
    reg = registry(backend.open())
    # SeaweedFS serializes conditional creates of one key with 1-second back-offs: fewer writers there.
    rounds, writers = (5, 20) if backend.kind == "directory" else (3, 6)
    for round_ in range(rounds):
        versions = [adapter() for _ in range(writers)]
        results = _put_at_once(reg, f"same-{round_}", versions)
        assert sum(created for _, created in results) == 1, round_  # one writer created it, the rest replaced
        shas = {info.sha256 for info, _ in results}
        assert len(shas) == len(versions)  # each answer is the version its own writer stored
        loaded, info, _ = reg.store.load("default", f"same-{round_}")
        assert info.sha256 in shas
