"""Keys of the prompt cache: a hash chain over a row's full blocks of tokens, rooted in what else decides them.

The keys/values of a block depend on every token before it and on the adapter prefix in front, so a block's
key is sha256(previous key + its tokens), and the first block's previous key is the root: the adapter's
identity and version digest (none for the base model), a salt derived by the server from the authenticated
tenant (unless the operator shares base-model prefixes across tenants), and the request's own `cache_salt`.
A replaced or deleted adapter, another composition or another tenant therefore never reaches old blocks.
sha256, not Python's hash: a crafted prompt must not be able to collide with someone else's block.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Hashable
from enum import Enum

MAX_CACHE_SALT_CHARS = 256


class CacheScope(str, Enum):
    TENANT = "tenant"  # blocks are shared only among one tenant's requests
    GLOBAL = "global"  # base-model blocks are shared across tenants too (adapters belong to one tenant)


def cache_root(prefix_key: Hashable | None, tenant: str, cache_salt: str | None, scope: CacheScope) -> bytes:
    """The key that a request's first block chains from."""
    shared = scope is CacheScope.GLOBAL and prefix_key is None
    parts = {
        "adapter": None if prefix_key is None else repr(prefix_key),
        "tenant": None if shared else tenant,
        "salt": cache_salt,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()


def extend_chain(hashes: list[bytes], root: bytes, token_ids: list[int], block_size: int) -> None:
    """Append the keys of the full blocks of `token_ids` that `hashes` does not cover yet."""
    previous = hashes[-1] if hashes else root
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[start : start + block_size]).tobytes()
        previous = hashlib.sha256(previous + block).digest()
        hashes.append(previous)
