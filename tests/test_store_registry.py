"""The durable store (atomic, hashed) and the registry (LRU by bytes, refresh, composition)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixserve import metrics
from prefixserve.adapters.errors import (
    AdapterIntegrityError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    StoreError,
    StoreFullError,
)
from prefixserve.adapters.format import embeddings_to_kv, read_upload
from prefixserve.adapters.registry import AdapterRegistry
from prefixserve.adapters.store import AdapterStore
from tests.test_adapter_format import LIMIT, SHAPE, peft_files


def adapter(t: int = 5):
    return read_upload(list(peft_files(t=t).items()), LIMIT)


def registry(root: Path, cache_bytes: int = 2**20, refresh: float = 0.0, max_t: int = 64) -> AdapterRegistry:
    return AdapterRegistry(
        AdapterStore(root), SHAPE, torch.float32, torch.device("cpu"), cache_bytes, max_t, refresh
    )


def test_put_get_roundtrip_with_hash_and_times(tmp_path):
    store = AdapterStore(tmp_path)
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


def test_namespaces_are_separate(tmp_path):
    store = AdapterStore(tmp_path)
    store.put("acme", "support", adapter())
    with pytest.raises(AdapterNotFoundError):
        store.info("globex", "support")
    assert store.list("globex") == []


def test_invalid_ids_are_refused(tmp_path):
    store = AdapterStore(tmp_path)
    for bad in ("../x", "", "a/b", ".hidden", "x" * 129):
        with pytest.raises(InvalidAdapterIdError):
            store.put("default", bad, adapter())


def test_a_crash_mid_write_leaves_the_old_version(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    old, _ = store.put("default", "a", adapter())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="the adapter store failed"):
        store.put("default", "a", adapter())
    monkeypatch.undo()
    assert store.info("default", "a").sha256 == old.sha256
    assert not list((tmp_path / "default").glob(".tmp-*")), "temp file left behind"


def test_concurrent_writers_leave_one_complete_version(tmp_path):
    store = AdapterStore(tmp_path)
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
    evictions = metrics.ADAPTER_CACHE_EVICTIONS._value.get()
    reg.get("default", ("a",))
    reg.get("default", ("b",))
    assert reg.is_loaded("default", "a") and reg.is_loaded("default", "b")
    reg.get("default", ("a",))  # a is now most recent
    reg.get("default", ("c",))  # 5+4+3 > 10: evicts b, the least recently used
    assert reg.is_loaded("default", "a") and not reg.is_loaded("default", "b")
    assert metrics.ADAPTER_CACHE_EVICTIONS._value.get() == evictions + 1


def test_replacement_by_another_replica_is_seen_within_the_refresh_time(tmp_path):
    reg = registry(tmp_path, refresh=0.2)
    other_replica = AdapterStore(tmp_path)
    reg.put("default", "a", adapter())
    old = reg.get("default", ("a",))
    other_replica.put("default", "a", adapter())
    assert reg.get("default", ("a",)) is old  # within the refresh window the cached version may serve
    time.sleep(0.25)
    assert reg.get("default", ("a",)).sha256 != old.sha256
    other_replica.delete("default", "a")
    time.sleep(0.25)
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


def test_missing_adapter(tmp_path):
    with pytest.raises(AdapterNotFoundError, match="PUT /v1/adapters/nope"):
        registry(tmp_path).get("default", ("nope",))


def test_a_file_changed_on_disk_is_never_served(tmp_path):
    reg = registry(tmp_path)
    reg.put("default", "a", adapter())
    reg.put("default", "b", other := adapter())
    path = tmp_path / "default" / "a.safetensors"
    metadata = AdapterStore(tmp_path).info("default", "a")
    with open(path, "rb") as fh:  # a's header (id, sha256) kept, b's weights put in
        header = __import__("safetensors").safe_open(fh.name, "pt").metadata()
    save_file({"prompt_embeddings": other.embeddings}, str(path), metadata=header)
    with pytest.raises(AdapterIntegrityError, match=f"does not match the sha256 recorded.*{metadata.sha256}"):
        reg.get("default", ("a",))
    assert torch.equal(load_file(str(path))["prompt_embeddings"], other.embeddings)
    assert reg.get("default", ("b",)).num_virtual_tokens == 5  # other adapters unaffected


def test_a_corrupted_stored_file_is_replaced_by_a_put(tmp_path):
    reg = registry(tmp_path)
    old, _ = reg.put("default", "a", adapter())
    (tmp_path / "default" / "a.safetensors").write_bytes(b"garbage")
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
    store = AdapterStore(tmp_path)
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
    store = AdapterStore(tmp_path)
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


def test_concurrent_puts_of_one_id_each_describe_their_own_version(tmp_path):
    reg = registry(tmp_path)
    for round_ in range(5):
        versions = [adapter() for _ in range(20)]
        results = _put_at_once(reg, f"same-{round_}", versions)
        assert sum(created for _, created in results) == 1, round_  # one writer created it, the rest replaced
        shas = {info.sha256 for info, _ in results}
        assert len(shas) == len(versions)  # each answer is the version its own writer stored
        loaded, info, _ = reg.store.load("default", f"same-{round_}")
        assert info.sha256 in shas
