"""The adapter store in an S3-compatible bucket (`--adapter-dir s3://BUCKET/PREFIX`): one object per adapter.

Layout: `PREFIX/<namespace>/<adapter_id>.safetensors`, holding the same bytes the directory store writes
(store_format: `prompt_embeddings` as uploaded; the PEFT config, content sha256 and creation time in the
safetensors header), so a store can be copied between a directory and a bucket as it is. The promises are
the directory store's:

- Whole or not at all: a version is one PutObject, which S3 makes visible only once all of it arrived; it
  carries the object's SHA-256 (x-amz-checksum-sha256), so the service refuses a body damaged on the way.
- The content sha256 recorded at upload is verified on every load (AdapterIntegrityError on a mismatch).
- `fingerprint` is the object's ETag from a HEAD: the registry's refresh notices a version replaced or
  deleted by another replica within --adapter-refresh-seconds, with one HEAD and no re-read.
- `list` pages through ListObjectsV2 and reads only the safetensors header of an object (a ranged GET of
  its first bytes) that it has not seen in that version (ETag) before.

Client and credentials: s3_client (boto3; the standard AWS_* variables).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from botocore.exceptions import ClientError
from cachetools import LRUCache

from prefixserve.adapters.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    StoreError,
)
from prefixserve.adapters.ids import validate_adapter_id
from prefixserve.adapters.locations import S3Location
from prefixserve.adapters.s3_client import check_bucket, error_code, is_not_found, make_client, s3_faults
from prefixserve.adapters.store import AdapterInfo, Fingerprint
from prefixserve.adapters.store_blob import Blob, BlobStore, listed_info
from prefixserve.adapters.store_format import FILE_SUFFIX, header_length, info_from_metadata, unreadable

log = logging.getLogger("prefixserve.adapters.store")
HEADER_PROBE_BYTES = 16 * 1024  # one ranged GET covers a prefixserve header (the PEFT config: ~1 KB)
MAX_HEADER_BYTES = 1024 * 1024  # larger is not a file this server wrote
LIST_PAGE_SIZE = 1000  # ListObjectsV2's largest page
LIST_READERS = 8  # parallel header reads for objects a listing has not seen before
INFO_CACHE_ENTRIES = 10_000  # headers kept by (key, ETag): a repeated listing costs its pages only


class S3Store(BlobStore):
    def __init__(self, location: S3Location, client: Any = None, page_size: int = LIST_PAGE_SIZE) -> None:
        self.location = location
        self.client = client if client is not None else make_client()
        self.page_size = page_size
        self._infos: LRUCache[tuple[str, str], AdapterInfo] = LRUCache(maxsize=INFO_CACHE_ENTRIES)
        self._infos_lock = threading.Lock()
        check_bucket(self.client, location)  # a missing bucket or wrong credentials: StoreError now

    def describe(self) -> str:
        return f"{self.location} (S3 endpoint {self.client.meta.endpoint_url})"

    def key(self, namespace: str, adapter_id: str) -> str:
        self.check_ids(namespace, adapter_id)
        return f"{self.location.prefix}{namespace}/{adapter_id}{FILE_SUFFIX}"

    def url(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{key}"

    def _write(self, namespace: str, adapter_id: str, data: bytes) -> tuple[bool, float]:
        key = self.key(namespace, adapter_id)
        request = {
            "Bucket": self.location.bucket,
            "Key": key,
            "Body": data,
            "ContentType": "application/octet-stream",
            "ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
        }
        with s3_faults(adapter_id, "store", self.url(key)):
            # `created`: a conditional PUT (If-None-Match: *) creates the object only where there is none,
            # atomically, so of several writers storing a new id at once exactly one is told it created it
            # (as the directory store's hard link does). The others then replace it unconditionally.
            # SeaweedFS, MinIO, Ceph and AWS S3 (since 2024) support it; a service that ignored the header
            # would only make every PUT answer 201.
            try:
                self.client.put_object(**request, IfNoneMatch="*")
                created = True
            except ClientError as exc:
                # 412: it exists. 409: AWS's answer when a concurrent conditional write to the key is in flight.
                if error_code(exc)[1] not in (409, 412):
                    raise
                self.client.put_object(**request)
                created = False
        return created, time.time()

    def _read(self, namespace: str, adapter_id: str) -> Blob:
        key = self.key(namespace, adapter_id)
        with s3_faults(adapter_id, "read", self.url(key)):
            try:
                response = self.client.get_object(Bucket=self.location.bucket, Key=key)
            except ClientError as exc:
                if is_not_found(exc):
                    raise AdapterNotFoundError(adapter_id) from None
                raise
            data = response["Body"].read()
        return Blob(data, self.url(key), response["LastModified"].timestamp(), response["ETag"])

    def info(self, namespace: str, adapter_id: str) -> AdapterInfo:
        """From the object's header only (a ranged GET of its first bytes)."""
        return self._read_info(namespace, adapter_id, self.key(namespace, adapter_id))

    def fingerprint(self, namespace: str, adapter_id: str) -> Fingerprint | None:
        key = self.key(namespace, adapter_id)
        with s3_faults(adapter_id, "read", self.url(key)):
            return self._etag(key)

    def list(self, namespace: str) -> list[AdapterInfo]:
        prefix = f"{self.location.prefix}{validate_adapter_id(namespace, 'tenant')}/"
        listed: list[tuple[str, str, str]] = []  # (adapter id, key, ETag)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.location.bucket,
            Prefix=prefix,
            Delimiter="/",  # only this namespace's own objects, not deeper "directories"
            PaginationConfig={"PageSize": self.page_size},
        )
        with s3_faults(namespace, "list the adapters of", self.url(prefix)):
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :]
                    if name.endswith(FILE_SUFFIX) and not name.startswith("."):
                        listed.append((name[: -len(FILE_SUFFIX)], obj["Key"], obj["ETag"]))
        # Sorted by id, which is what pagination cursors compare (key order differs: '-' < '.').
        listed.sort()
        with self._infos_lock:
            infos: list[AdapterInfo | None] = [self._infos.get((key, etag)) for _, key, etag in listed]
        missing = [i for i, info in enumerate(infos) if info is None]
        if missing:
            with ThreadPoolExecutor(min(LIST_READERS, len(missing))) as pool:
                read = pool.map(lambda i: self._listed_info(namespace, *listed[i][:2]), missing)
                for i, info in zip(missing, read, strict=True):
                    infos[i] = info
        return [info for info in infos if info is not None]

    def delete(self, namespace: str, adapter_id: str) -> None:
        key = self.key(namespace, adapter_id)
        with s3_faults(adapter_id, "delete", self.url(key)):
            if self._etag(key) is None:  # S3's DELETE succeeds on a missing key: ask first
                raise AdapterNotFoundError(adapter_id)
            self.client.delete_object(Bucket=self.location.bucket, Key=key)

    def sweep_temp_files(self) -> int:
        """Nothing to sweep: a write is one PutObject, which leaves no partial object when it fails (S3
        discards an incomplete upload; no multipart uploads are started, which could be left open)."""
        return 0

    def _etag(self, key: str) -> str | None:
        try:
            return self.client.head_object(Bucket=self.location.bucket, Key=key)["ETag"]
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise

    def _listed_info(self, namespace: str, adapter_id: str, key: str) -> AdapterInfo | None:
        # A StoreError (the service failing, access denied) fails the listing: skipping would hide adapters.
        read = partial(self._read_info, namespace, adapter_id, key)
        return listed_info(read, adapter_id, self.url(key), (InvalidAdapterError, InvalidAdapterIdError))

    def _read_info(self, namespace: str, adapter_id: str, key: str) -> AdapterInfo:
        validate_adapter_id(adapter_id)
        with s3_faults(adapter_id, "read", self.url(key)):
            head, response = self._get_range(adapter_id, key, 0, HEADER_PROBE_BYTES)
            etag = response["ETag"]
            size = _object_size(response)
            try:
                n = header_length(head)
            except ValueError as exc:
                raise unreadable(adapter_id, str(exc)) from None
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise unreadable(adapter_id, f"a safetensors header of {n} bytes in an object of {size}")
            if 8 + n > len(head):  # a long header: the rest of it, from the same version
                more, _ = self._get_range(adapter_id, key, len(head), 8 + n - len(head), if_match=etag)
                head += more
        try:
            header = json.loads(head[8 : 8 + n])
            metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        except ValueError as exc:
            raise unreadable(adapter_id, f"its safetensors header is not JSON: {exc}") from None
        updated_at = response["LastModified"].timestamp()
        info = info_from_metadata(namespace, adapter_id, metadata, size, updated_at)
        with self._infos_lock:
            self._infos[(key, etag)] = info
        return info

    def _get_range(
        self, adapter_id: str, key: str, start: int, length: int, if_match: str | None = None
    ) -> tuple[bytes, dict[str, Any]]:
        request = {"Bucket": self.location.bucket, "Key": key, "Range": f"bytes={start}-{start + length - 1}"}
        if if_match is not None:
            request["IfMatch"] = if_match
        try:
            response = self.client.get_object(**request)
        except ClientError as exc:
            code, status = error_code(exc)
            if is_not_found(exc):
                raise AdapterNotFoundError(adapter_id) from None
            if status == 416:  # a range starting past the end: an empty object
                raise unreadable(adapter_id, "an empty object") from None
            if status == 412:  # replaced between the two reads of one header
                raise StoreError(
                    f"adapter '{adapter_id}' was replaced while its header was read; retry"
                ) from None
            raise
        return response["Body"].read(), response


def _object_size(response: dict[str, Any]) -> int:
    """The whole object's size, from a ranged GET's Content-Range ('bytes 0-99/1234')."""
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isascii() and total.isdigit():
            return int(total)
    return int(response["ContentLength"])
