"""What every adapter store backend does alike, whatever holds its bytes: ids checked, a version's creation
time kept across replacements, the stored bytes encoded and decoded with their sha256 verified, and listing
entries that cannot be read logged and left out. A backend (store_dir: files; store_s3: objects) subclasses
`BlobStore` and says only how to address, write, read, stat, list and delete one blob.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from prefixserve.adapters.errors import AdapterNotFoundError, InvalidAdapterError
from prefixserve.adapters.format import PeftAdapter
from prefixserve.adapters.ids import validate_adapter_id
from prefixserve.adapters.store import AdapterInfo, Fingerprint
from prefixserve.adapters.store_format import decode_verified, encode_adapter, stored_info

log = logging.getLogger("prefixserve.adapters.store")


@dataclass(frozen=True)
class Blob:
    """One stored version as a backend read it."""

    data: bytes
    where: str  # the file or object, for messages
    updated_at: float
    fingerprint: Fingerprint


class BlobStore(ABC):
    """An `AdapterStore` (store.py) over one blob per (namespace, adapter id)."""

    def put(self, namespace: str, adapter_id: str, adapter: PeftAdapter) -> tuple[AdapterInfo, bool]:
        """Store (create or replace) an adapter; returns what this call stored and whether it was new."""
        self.check_ids(namespace, adapter_id)
        try:
            created_at = self.info(namespace, adapter_id).created_at
        except (AdapterNotFoundError, InvalidAdapterError):  # new, or unreadable: replaced all the same
            created_at = time.time()
        data, sha256 = encode_adapter(adapter, created_at)
        created, updated_at = self._write(namespace, adapter_id, data)
        info = stored_info(namespace, adapter_id, adapter, sha256, len(data), created_at, updated_at)
        return info, created

    def load(self, namespace: str, adapter_id: str) -> tuple[PeftAdapter, AdapterInfo, Fingerprint]:
        """Read an adapter, verifying its content against the sha256 recorded when it was stored."""
        self.check_ids(namespace, adapter_id)
        blob = self._read(namespace, adapter_id)
        adapter, info = decode_verified(namespace, adapter_id, blob.data, blob.where, blob.updated_at)
        return adapter, info, blob.fingerprint

    @staticmethod
    def check_ids(namespace: str, adapter_id: str) -> None:
        validate_adapter_id(namespace, "tenant")
        validate_adapter_id(adapter_id)

    @abstractmethod
    def _write(self, namespace: str, adapter_id: str, data: bytes) -> tuple[bool, float]:
        """Publish `data` whole or not at all; returns (whether no version existed, its modification time)."""

    @abstractmethod
    def _read(self, namespace: str, adapter_id: str) -> Blob:
        """The stored version (AdapterNotFoundError when there is none)."""

    @abstractmethod
    def info(self, namespace: str, adapter_id: str) -> AdapterInfo: ...

    @abstractmethod
    def fingerprint(self, namespace: str, adapter_id: str) -> Fingerprint | None: ...

    @abstractmethod
    def list(self, namespace: str) -> list[AdapterInfo]: ...

    @abstractmethod
    def delete(self, namespace: str, adapter_id: str) -> None: ...

    @abstractmethod
    def sweep_temp_files(self) -> int: ...

    @abstractmethod
    def describe(self) -> str: ...


def listed_info(
    read: Callable[[], AdapterInfo],
    adapter_id: str,
    where: str,
    skipped: tuple[type[Exception], ...],
) -> AdapterInfo | None:
    """A listing's entry for `adapter_id`: None when it was deleted while listing, or (logged) when reading
    it raised one of `skipped`, which the backend chooses: an unreadable entry must not hide the others."""
    try:
        return read()
    except AdapterNotFoundError:
        return None
    except skipped as exc:
        log.warning("skipping unreadable entry for adapter %r at %s: %s", adapter_id, where, exc)
        return None
