"""The durable adapter store: one safetensors file per adapter, written atomically.

Layout: `<root>/<namespace>/<adapter_id>.safetensors`, holding `prompt_embeddings` exactly as uploaded
and, in the safetensors header, the PEFT config, the content hash and the creation time. A write goes
to a temp file in the same directory, is fsynced, then renamed over the old file: readers (this
process, or other replicas on a shared volume) see the old version or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from prefixserve.adapters.errors import (
    AdapterIntegrityError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    StoreError,
)
from prefixserve.adapters.format import TENSOR_NAME, PrefixAdapter, parse_config, parse_weights
from prefixserve.adapters.ids import validate_adapter_id
from prefixserve.adapters.store_files import fsync_dir, publish, storage_faults

log = logging.getLogger(__name__)
FILE_SUFFIX = ".safetensors"
FORMAT_TAG = "prefixserve.adapter/1"
STALE_TEMP_SECONDS = 600.0

# A version fingerprint: changes whenever the file is replaced or removed.
Fingerprint = tuple[int, int, int]


@dataclass(frozen=True)
class AdapterInfo:
    namespace: str
    adapter_id: str
    peft_type: str
    num_virtual_tokens: int
    sha256: str
    size_bytes: int
    created_at: float
    updated_at: float
    config: dict[str, Any] = field(repr=False)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_temp_files()

    def path(self, namespace: str, adapter_id: str) -> Path:
        validate_adapter_id(namespace, "tenant")
        validate_adapter_id(adapter_id)
        return self.root / namespace / f"{adapter_id}{FILE_SUFFIX}"

    def put(self, namespace: str, adapter_id: str, adapter: PrefixAdapter) -> tuple[AdapterInfo, bool]:
        """Store (create or replace) an adapter; returns what this call stored and whether it was new."""
        path = self.path(namespace, adapter_id)
        config_json = json.dumps(adapter.config, sort_keys=True)
        tensors = {TENSOR_NAME: adapter.embeddings.contiguous()}
        sha256 = _content_sha256(tensors, config_json)
        try:
            created_at = self.info(namespace, adapter_id).created_at
        except (AdapterNotFoundError, InvalidAdapterError):  # new, or unreadable: replaced all the same
            created_at = time.time()
        metadata = {
            "format": FORMAT_TAG,
            "adapter_config": config_json,
            "sha256": sha256,
            "created_at": repr(created_at),
        }
        data = save_safetensors(tensors, metadata=metadata)
        with storage_faults(adapter_id, "store", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".tmp-{adapter_id}-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                    updated_at = os.fstat(fh.fileno()).st_mtime
                created = publish(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(path.parent)
        # Described from what was written here, not read back: a concurrent writer may have replaced it since.
        info = AdapterInfo(
            namespace=namespace,
            adapter_id=adapter_id,
            peft_type=adapter.config["peft_type"],
            num_virtual_tokens=adapter.config["num_virtual_tokens"],
            sha256=sha256,
            size_bytes=len(data),
            created_at=created_at,
            updated_at=updated_at,
            config=adapter.config,
        )
        return info, created

    def load(self, namespace: str, adapter_id: str) -> tuple[PrefixAdapter, AdapterInfo, Fingerprint]:
        """Read an adapter, verifying its content against the sha256 recorded when it was stored."""
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "read", path):
            try:
                with open(path, "rb") as fh:
                    stat = os.fstat(fh.fileno())
                    data = fh.read()
            except FileNotFoundError:
                raise AdapterNotFoundError(adapter_id) from None
            except IsADirectoryError:
                raise _unreadable(adapter_id, "a directory, not a file") from None
        try:
            embeddings = parse_weights(data)
            metadata = _header_metadata(data)
        except (InvalidAdapterError, ValueError) as exc:
            raise _unreadable(adapter_id, str(exc)) from None
        info = self._info_from_metadata(namespace, adapter_id, metadata, stat)
        actual = _content_sha256({TENSOR_NAME: embeddings}, metadata["adapter_config"])
        if actual != info.sha256:
            log.error(
                "adapter %r of %r: %s hashes to %s, not the sha256 %s recorded at upload; refusing to serve it",
                adapter_id,
                namespace,
                path,
                actual,
                info.sha256,
            )
            raise AdapterIntegrityError(
                f"the stored file of adapter '{adapter_id}' does not match the sha256 recorded when it was "
                f"uploaded ({info.sha256}): it was changed on disk; upload the adapter again"
            )
        return PrefixAdapter(info.config, embeddings), info, _fingerprint(stat)

    def info(self, namespace: str, adapter_id: str) -> AdapterInfo:
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "read", path):
            try:
                stat = path.stat()
                if not S_ISREG(stat.st_mode):
                    raise _unreadable(adapter_id, "a directory or special file, not a file")
                with safe_open(str(path), framework="pt") as fh:
                    metadata = fh.metadata() or {}
            except FileNotFoundError:
                raise AdapterNotFoundError(adapter_id) from None
            except SafetensorError as exc:
                raise _unreadable(adapter_id, str(exc)) from None
        return self._info_from_metadata(namespace, adapter_id, metadata, stat)

    def fingerprint(self, namespace: str, adapter_id: str) -> Fingerprint | None:
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "read", path):
            try:
                return _fingerprint(path.stat())
            except FileNotFoundError:
                return None

    def list(self, namespace: str) -> list[AdapterInfo]:
        directory = self.root / validate_adapter_id(namespace, "tenant")
        if not directory.is_dir():
            return []
        with storage_faults(namespace, "list the adapters of", directory):
            ids = sorted(
                p.name[: -len(FILE_SUFFIX)]
                for p in directory.glob(f"*{FILE_SUFFIX}")
                if not p.name.startswith(".")
            )
        infos = []
        for adapter_id in ids:  # sorted by id, which is what pagination cursors compare
            try:
                infos.append(self.info(namespace, adapter_id))
            except AdapterNotFoundError:
                continue  # deleted while listing
            except (InvalidAdapterError, InvalidAdapterIdError, StoreError) as exc:
                log.warning("skipping unreadable entry for adapter %r in %s: %s", adapter_id, directory, exc)
        return infos

    def delete(self, namespace: str, adapter_id: str) -> None:
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "delete", path):
            try:
                path.unlink()
            except FileNotFoundError:
                raise AdapterNotFoundError(adapter_id) from None
            fsync_dir(path.parent)

    def _info_from_metadata(
        self, namespace: str, adapter_id: str, metadata: dict[str, str], stat: os.stat_result
    ) -> AdapterInfo:
        try:
            if metadata.get("format") != FORMAT_TAG:
                raise ValueError("not written by prefixserve")
            config = parse_config(metadata["adapter_config"].encode())
            return AdapterInfo(
                namespace=namespace,
                adapter_id=adapter_id,
                peft_type=config["peft_type"],
                num_virtual_tokens=config["num_virtual_tokens"],
                sha256=metadata["sha256"],
                size_bytes=stat.st_size,
                created_at=float(metadata["created_at"]),
                updated_at=stat.st_mtime,
                config=config,
            )
        except (KeyError, ValueError, InvalidAdapterError) as exc:
            raise _unreadable(adapter_id, str(exc)) from None

    def sweep_temp_files(self) -> int:
        """Remove temp files left by a crash (at start-up, then periodically); young ones may belong to
        another replica's upload in progress. Returns how many were removed."""
        now, removed = time.time(), 0
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # a read-only store: nothing to clean now
                log.warning("cannot remove stale temp file %s: %s", tmp, exc)
        if removed:
            log.info("removed %d stale temp file(s) from the adapter store", removed)
        return removed


def _unreadable(adapter_id: str, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"the stored file of adapter '{adapter_id}' is unreadable ({why}); upload the adapter again"
    )


def _content_sha256(tensors: dict[str, torch.Tensor], config_json: str) -> str:
    """The recorded hash: of the tensor and the config, serialized without the store's other metadata."""
    return hashlib.sha256(save_safetensors(tensors, metadata={"adapter_config": config_json})).hexdigest()


def _fingerprint(stat: os.stat_result) -> Fingerprint:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _header_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})
