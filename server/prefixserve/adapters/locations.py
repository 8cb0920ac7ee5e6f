"""Where the adapter store is: a directory (a Path) or `s3://BUCKET/PREFIX` (an S3Location).

Parsed as a string, never through Path: `Path("s3://b/p")` collapses the double slash. Nothing here imports
boto3 or torch: the settings use it, and `prefixserve serve --help` must stay quick.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

S3_SCHEME = "s3://"
# S3's rules for bucket names (3-63 characters: lower-case letters, digits, '.' and '-', starting and
# ending with a letter or digit); S3-compatible servers accept these too.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9!_.*'()/-]*")


class S3Location(str):
    """`s3://BUCKET/PREFIX`, kept as written; `bucket`, and `prefix` as a key prefix ('' or ending in '/')."""

    @property
    def bucket(self) -> str:
        return self[len(S3_SCHEME) :].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self[len(S3_SCHEME) :].partition("/")[2].strip("/")
        return f"{rest}/" if rest else ""

    @classmethod
    def parse(cls, text: str) -> S3Location:
        bucket, _, prefix = text[len(S3_SCHEME) :].partition("/")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ValueError(
                f"{text!r}: the bucket name {bucket!r} is not a valid S3 bucket name (3-63 characters: "
                "lower-case letters, digits, '.' and '-'); write s3://BUCKET or s3://BUCKET/PREFIX"
            )
        if (
            not _PREFIX_RE.fullmatch(prefix)
            or "//" in prefix
            or any(p in (".", "..") for p in prefix.split("/"))
        ):
            raise ValueError(
                f"{text!r}: the prefix {prefix!r} may hold letters, digits and !_.*'()- in segments "
                "separated by single '/'; write s3://BUCKET or s3://BUCKET/PREFIX"
            )
        return cls(text)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # Instances only: `parse_store_location` (a before-validator of the setting) makes them from text.
        return core_schema.is_instance_schema(cls, serialization=core_schema.to_string_ser_schema())


def parse_store_location(value: Any) -> Any:
    """`s3://...` text → S3Location; other text → Path; anything else unchanged (for pydantic to judge)."""
    if isinstance(value, S3Location):
        return value
    if isinstance(value, str) and value.lower().startswith(S3_SCHEME):
        if not value.startswith(S3_SCHEME):
            value = S3_SCHEME + value[len(S3_SCHEME) :]
        return S3Location.parse(value)
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    return value
