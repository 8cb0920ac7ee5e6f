"""The durable adapter store's contract: what every backend promises (`AdapterStore`) and what it describes
an adapter with (`AdapterInfo`). `stores.open_store` picks a backend by location; `store_blob` holds what the
backends share.

Backends: a directory (`store_dir.DirectoryStore`: a local disk, or a shared volume for several replicas)
and an S3-compatible bucket (`store_s3.S3Store`, `--adapter-dir s3://BUCKET/PREFIX`). Both store one
safetensors file per adapter with the same bytes (`store_format`), and promise the same: a version is
written whole or not at all; its sha256 is recorded and verified on every load; `fingerprint` changes when
another replica replaces or deletes it and costs no re-read, so the registry notices within
--adapter-refresh-seconds; `list` is sorted by id, which is what pagination cursors compare.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefixserve.adapters.format import PeftAdapter, method_of

# A version fingerprint: changes whenever the stored adapter is replaced or removed. A file's
# (inode, mtime, size); an object's ETag.
Fingerprint = Hashable


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

    @property
    def method(self) -> str:
        return method_of(self.peft_type)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def prefix_projection(self) -> bool | None:
        return self.config.get("prefix_projection")


class AdapterStore(Protocol):
    """Adapters by namespace (tenant) and id. Invalid ids raise InvalidAdapterIdError; a missing adapter
    AdapterNotFoundError; a stored file that cannot be read InvalidAdapterError (AdapterIntegrityError when
    its content no longer matches its sha256); a store that cannot be used StoreError (503)."""

    def put(self, namespace: str, adapter_id: str, adapter: PeftAdapter) -> tuple[AdapterInfo, bool]:
        """Store (create or replace) an adapter; returns what this call stored and whether it was new."""
        ...

    def load(self, namespace: str, adapter_id: str) -> tuple[PeftAdapter, AdapterInfo, Fingerprint]:
        """Read an adapter, verifying its content against the sha256 recorded when it was stored."""
        ...

    def info(self, namespace: str, adapter_id: str) -> AdapterInfo: ...

    def fingerprint(self, namespace: str, adapter_id: str) -> Fingerprint | None:
        """The stored version's fingerprint (None: no such adapter), without reading the adapter."""
        ...

    def list(self, namespace: str) -> list[AdapterInfo]:
        """Every readable adapter of `namespace`, sorted by id."""
        ...

    def delete(self, namespace: str, adapter_id: str) -> None: ...

    def sweep_temp_files(self) -> int:
        """Remove what crashed writes left behind; returns how many were removed."""
        ...

    def describe(self) -> str:
        """Where the store is, for the start-up log."""
        ...
