"""API keys and tenants. Only key hashes are kept; a presented key is compared in constant time.

Keys file: {"keys": [{"key": "...", "tenant": "acme"}, {"key_sha256": "<hex>", "tenant": "globex"},
{"key": "...", "tenant": "ops", "admin": true}]}. Each tenant's adapters live in their own namespace; an
admin key may act on any tenant by naming it in the `X-Tenant` header.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prefixserve.adapters.errors import InvalidAdapterIdError
from prefixserve.adapters.ids import validate_adapter_id
from prefixserve.api.errors import APIError

log = logging.getLogger(__name__)

ANONYMOUS_TENANT = "default"
TENANT_HEADER = "x-tenant"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes
    principal: Principal


class KeyFileError(ValueError):
    pass


class KeyRing:
    def __init__(self, entries: list[_KeyEntry]) -> None:
        self._entries = entries

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KeyFileError(f"cannot read API keys file {path}: {exc}") from None
        items = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            raise KeyFileError(
                f'{path}: expected {{"keys": [{{"key": "...", "tenant": "..."}}, ...]}} with at least one key'
            )
        entries = []
        for i, item in enumerate(items):
            where = f"{path}: keys[{i}]"
            if not isinstance(item, dict):
                raise KeyFileError(f"{where} must be an object")
            tenant = item.get("tenant")
            if not isinstance(tenant, str):
                raise KeyFileError(f"{where}: 'tenant' must be a string")
            try:
                validate_adapter_id(tenant, "tenant")
            except InvalidAdapterIdError as exc:
                raise KeyFileError(f"{where}: {exc}") from None
            admin = item.get("admin", False)
            if not isinstance(admin, bool):
                raise KeyFileError(f"{where}: 'admin' must be true or false (a JSON boolean), got {admin!r}")
            if isinstance(item.get("key"), str) and len(item["key"]) >= 16:
                digest = hashlib.sha256(item["key"].encode()).digest()
            elif "key_sha256" in item:
                try:
                    digest = bytes.fromhex(str(item["key_sha256"]))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise KeyFileError(f"{where}: key_sha256 must be 64 hex characters")
            else:
                raise KeyFileError(f"{where}: give 'key' (at least 16 characters) or 'key_sha256'")
            if any(hmac.compare_digest(digest, e.digest) for e in entries):
                raise KeyFileError(f"{where}: this key is listed twice; each key maps to one tenant")
            entries.append(_KeyEntry(digest, Principal(tenant, admin)))
        return cls(entries)

    def authenticate(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for entry in self._entries:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        return found


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only. An empty host binds every interface: not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Turns a request's headers into a Principal, or refuses it (401 / 403)."""

    def __init__(self, keyring: KeyRing | None) -> None:
        self.keyring = keyring

    def __call__(self, headers: Mapping[str, str]) -> Principal:
        if self.keyring is None:
            return Principal(ANONYMOUS_TENANT)
        header = headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            )
        principal = self.keyring.authenticate(key.strip())
        if principal is None:
            raise APIError(401, "invalid API key", "unauthorized", {"WWW-Authenticate": "Bearer"})
        acting_for = headers.get(TENANT_HEADER)
        if acting_for and acting_for != principal.tenant:
            if not principal.admin:
                raise APIError(
                    403, f"only an admin key may act for another tenant ({TENANT_HEADER} header)", "forbidden"
                )
            try:
                validate_adapter_id(acting_for, "tenant")
            except InvalidAdapterIdError as exc:
                raise APIError(422, str(exc), "validation") from None
            return Principal(acting_for, admin=True)
        return principal
