"""`open_store`: the adapter store backend for a `--adapter-dir` location (a directory or `s3://BUCKET/PREFIX`).

Apart from store.py (the contract) so that the backends import only the contract, and boto3 is imported
only when a bucket is used.
"""

from __future__ import annotations

import os

from prefixserve.adapters.locations import S3Location, parse_store_location
from prefixserve.adapters.store import AdapterStore


def open_store(location: str | os.PathLike[str]) -> AdapterStore:
    """The store at `location`: `s3://BUCKET/PREFIX` for a bucket, anything else is a directory."""
    parsed = parse_store_location(location)
    if isinstance(parsed, S3Location):
        from prefixserve.adapters.store_s3 import S3Store

        return S3Store(parsed)
    from prefixserve.adapters.store_dir import DirectoryStore

    return DirectoryStore(parsed)
