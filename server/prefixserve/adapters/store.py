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
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from prefixserve.adapters.errors import AdapterNotFoundError, InvalidAdapterError, InvalidAdapterIdError
from prefixserve.adapters.format import TENSOR_NAME, PrefixAdapter, parse_config, parse_weights
from prefixserve.adapters.ids import validate_adapter_id

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
        self._remove_stale_temp_files()

    def path(self, namespace: str, adapter_id: str) -> Path:
        validate_adapter_id(namespace, "tenant")
        validate_adapter_id(adapter_id)
        return self.root / namespace / f"{adapter_id}{FILE_SUFFIX}"

    def put(self, namespace: str, adapter_id: str, adapter: PrefixAdapter) -> tuple[AdapterInfo, bool]:
        """Store (create or replace) an adapter; returns its info and whether it was new."""
        path = self.path(namespace, adapter_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps(adapter.config, sort_keys=True)
        tensors = {TENSOR_NAME: adapter.embeddings.contiguous()}
        sha256 = hashlib.sha256(
            save_safetensors(tensors, metadata={"adapter_config": config_json})
        ).hexdigest()
        try:
            created_at = self.info(namespace, adapter_id).created_at
            created = False
        except AdapterNotFoundError:
            created_at, created = time.time(), True
        metadata = {
            "format": FORMAT_TAG,
            "adapter_config": config_json,
            "sha256": sha256,
            "created_at": repr(created_at),
        }
        data = save_safetensors(tensors, metadata=metadata)
        tmp = path.parent / f".tmp-{adapter_id}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return self.info(namespace, adapter_id), created

    def load(self, namespace: str, adapter_id: str) -> tuple[PrefixAdapter, AdapterInfo, Fingerprint]:
        path = self.path(namespace, adapter_id)
        try:
            with open(path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            raise AdapterNotFoundError(adapter_id) from None
        embeddings = parse_weights(data)
        info = self._info_from_metadata(namespace, adapter_id, _header_metadata(data), stat)
        return PrefixAdapter(info.config, embeddings), info, _fingerprint(stat)

    def info(self, namespace: str, adapter_id: str) -> AdapterInfo:
        path = self.path(namespace, adapter_id)
        try:
            stat = path.stat()
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
        except FileNotFoundError:
            raise AdapterNotFoundError(adapter_id) from None
        except SafetensorError as exc:
            raise InvalidAdapterError(
                f"the stored file of adapter '{adapter_id}' is unreadable ({exc}); upload the adapter again"
            ) from None
        return self._info_from_metadata(namespace, adapter_id, metadata, stat)

    def fingerprint(self, namespace: str, adapter_id: str) -> Fingerprint | None:
        try:
            return _fingerprint(self.path(namespace, adapter_id).stat())
        except FileNotFoundError:
            return None

    def list(self, namespace: str) -> list[AdapterInfo]:
        directory = self.root / validate_adapter_id(namespace, "tenant")
        if not directory.is_dir():
            return []
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
            except (InvalidAdapterError, InvalidAdapterIdError) as exc:
                log.warning("skipping unreadable file for adapter %r in %s: %s", adapter_id, directory, exc)
        return infos

    def delete(self, namespace: str, adapter_id: str) -> None:
        path = self.path(namespace, adapter_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise AdapterNotFoundError(adapter_id) from None
        _fsync_dir(path.parent)

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
            raise InvalidAdapterError(
                f"the stored file of adapter '{adapter_id}' is unreadable ({exc}); upload the adapter again"
            ) from None

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a crash; young ones may belong to another replica's upload in progress."""
        now = time.time()
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def _fingerprint(stat: os.stat_result) -> Fingerprint:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _header_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
