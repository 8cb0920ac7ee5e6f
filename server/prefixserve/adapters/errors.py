"""Typed adapter errors. Each message says what is wrong and what to do about it."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class; `error_type` is the stable machine-readable name clients see."""

    error_type = "adapter_error"


class InvalidAdapterError(AdapterError):
    """The upload is not a PEFT adapter this server can read."""

    error_type = "invalid_adapter"


class AdapterMismatchError(InvalidAdapterError):
    """A well-formed adapter that was made for another base model shape."""

    error_type = "adapter_mismatch"


class AdapterTooLargeError(AdapterError):
    error_type = "adapter_too_large"


class AdapterNotFoundError(AdapterError):
    error_type = "adapter_not_found"

    def __init__(self, adapter_id: str) -> None:
        super().__init__(
            f"adapter '{adapter_id}' not found: upload it with PUT /v1/adapters/{adapter_id}, "
            "or list the available ones with GET /v1/adapters"
        )
        self.adapter_id = adapter_id


class InvalidAdapterIdError(AdapterError):
    error_type = "invalid_adapter_id"


class AdapterIntegrityError(InvalidAdapterError):
    """A stored file whose content no longer matches the sha256 recorded when it was uploaded."""

    error_type = "adapter_corrupt"


class StoreError(AdapterError):
    """The adapter store cannot be written or read (read-only, I/O error): 503, the server is otherwise fine."""

    error_type = "store_unavailable"


class StoreFullError(StoreError):
    """No space left in the adapter store: 507 Insufficient Storage."""

    error_type = "store_full"
