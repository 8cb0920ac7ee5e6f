"""The adapter store in a directory: one safetensors file per adapter, written atomically.

Layout: `<root>/<namespace>/<adapter_id>.safetensors`, holding `prompt_embeddings` exactly as uploaded
and, in the safetensors header, the PEFT config, the content hash and the creation time (store_format).
A write goes to a temp file in the same directory, is fsynced, then renamed over the old file: readers
(this process, or other replicas on a shared volume) see the old version or the new one, never a mix.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from functools import partial
from pathlib import Path
from stat import S_ISREG

from safetensors import SafetensorError, safe_open

from prefixserve.adapters.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    StoreError,
)
from prefixserve.adapters.ids import validate_adapter_id
from prefixserve.adapters.store import AdapterInfo, Fingerprint
from prefixserve.adapters.store_blob import Blob, BlobStore, listed_info
from prefixserve.adapters.store_files import fsync_dir, publish, storage_faults
from prefixserve.adapters.store_format import FILE_SUFFIX, info_from_metadata, unreadable

log = logging.getLogger("prefixserve.adapters.store")
STALE_TEMP_SECONDS = 600.0


class DirectoryStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_temp_files()

    def describe(self) -> str:
        return str(self.root.resolve())

    def path(self, namespace: str, adapter_id: str) -> Path:
        self.check_ids(namespace, adapter_id)
        return self.root / namespace / f"{adapter_id}{FILE_SUFFIX}"

    def _write(self, namespace: str, adapter_id: str, data: bytes) -> tuple[bool, float]:
        path = self.path(namespace, adapter_id)
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
        return created, updated_at

    def _read(self, namespace: str, adapter_id: str) -> Blob:
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "read", path):
            try:
                with open(path, "rb") as fh:
                    stat = os.fstat(fh.fileno())
                    data = fh.read()
            except FileNotFoundError:
                raise AdapterNotFoundError(adapter_id) from None
            except IsADirectoryError:
                raise unreadable(adapter_id, "a directory, not a file") from None
        return Blob(data, str(path), stat.st_mtime, _fingerprint(stat))

    def info(self, namespace: str, adapter_id: str) -> AdapterInfo:
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "read", path):
            try:
                stat = path.stat()
                if not S_ISREG(stat.st_mode):
                    raise unreadable(adapter_id, "a directory or special file, not a file")
                with safe_open(str(path), framework="pt") as fh:
                    metadata = fh.metadata() or {}
            except FileNotFoundError:
                raise AdapterNotFoundError(adapter_id) from None
            except SafetensorError as exc:
                raise unreadable(adapter_id, str(exc)) from None
        return info_from_metadata(namespace, adapter_id, metadata, stat.st_size, stat.st_mtime)

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
        # Sorted by id, which is what pagination cursors compare. A file this process cannot read (its
        # permissions, a damaged header) is skipped: the store stays usable for the others.
        skipped = (InvalidAdapterError, InvalidAdapterIdError, StoreError)
        infos = (listed_info(partial(self.info, namespace, i), i, str(directory), skipped) for i in ids)
        return [info for info in infos if info is not None]

    def delete(self, namespace: str, adapter_id: str) -> None:
        path = self.path(namespace, adapter_id)
        with storage_faults(adapter_id, "delete", path):
            try:
                path.unlink()
            except FileNotFoundError:
                raise AdapterNotFoundError(adapter_id) from None
            fsync_dir(path.parent)

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


def _fingerprint(stat: os.stat_result) -> Fingerprint:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
