"""Adapter ids, composition syntax (`a+b` serves a's prefix followed by b's) and `AdapterRef`, the one way
every layer names what a request is served with."""

from __future__ import annotations

import re

from prefixserve.adapters.errors import InvalidAdapterIdError

ADAPTER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ADAPTER_ID_RE = re.compile(ADAPTER_ID_PATTERN)
COMPOSE_SEPARATOR = "+"
MAX_COMPOSED_ADAPTERS = 8
# (namespace, adapter ids in composition order): a request's adapter, as the registry and engine key it.
AdapterRef = tuple[str, tuple[str, ...]]


def validate_adapter_id(adapter_id: str, what: str = "adapter id") -> str:
    flat = adapter_id.replace("/", "--")
    if "/" in adapter_id and _ADAPTER_ID_RE.fullmatch(
        flat
    ):  # a hub-style `org/name`: say why, and what to use
        raise InvalidAdapterIdError(
            f"invalid {what} {adapter_id!r}: '/' is not allowed (an id is one path segment, as in "
            f"/v1/adapters/{{id}}); use e.g. {flat!r}"
        )
    if not _ADAPTER_ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterIdError(
            f"invalid {what} {adapter_id!r}: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return adapter_id


def parse_adapter_spec(spec: str) -> tuple[str, ...]:
    """Split `a+b+c` into validated ids; a single id gives a 1-tuple."""
    parts = tuple(spec.split(COMPOSE_SEPARATOR))
    if len(parts) > MAX_COMPOSED_ADAPTERS:
        raise InvalidAdapterIdError(
            f"adapter composition {spec!r} names {len(parts)} adapters; at most {MAX_COMPOSED_ADAPTERS} are allowed"
        )
    for part in parts:
        validate_adapter_id(part)
    return parts
