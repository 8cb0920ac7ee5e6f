"""Typed engine errors; the API maps each `error_type` to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    error_type = "generation"


class RequestValidationError(EngineError):
    """The request cannot be served as asked (too long, bad sampling values, ...)."""

    error_type = "validation"


class QueueFullError(EngineError):
    error_type = "overloaded"


class EngineStoppedError(EngineError):
    error_type = "unavailable"


class UnsupportedModelError(Exception):
    """The base model cannot be served exactly; raised at start-up."""


class ModelLoadError(Exception):
    """`--model` names something that cannot be loaded (missing, not a model, not cached offline)."""
