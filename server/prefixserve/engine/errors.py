"""Typed engine errors; the API maps each `error_type` to an HTTP status."""

from __future__ import annotations

from collections.abc import Mapping

# The request fields the engine's messages name, and how the engine words them (`SamplingParams`' names).
# Each API words them its own way (`api/field_names.py`): TGI's `inputs`, OpenAI's `max_tokens`.
WORDING: dict[str, str] = {
    "prompt": "prompt",
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "logprobs": "logprobs",
    "prompt_logprobs": "prompt_logprobs",
    "logit_bias": "logit_bias",
    "stop_token_ids": "stop_token_ids",
    "stop": "stop",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "cache_salt": "cache_salt",
    "scoring": "when scoring the prompt",  # how a request scores its prompt (0 new tokens)
}


class EngineError(Exception):
    error_type = "generation"


class RequestValidationError(EngineError):
    """The request cannot be served as asked (too long, bad sampling values, ...).

    `field` is the field at fault (a WORDING key, or None). Made by `about`, the message is a template whose
    `{name}` placeholders (WORDING's keys) each API fills with its own words; `str()` uses the engine's."""

    error_type = "validation"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self._template: str | None = None
        self._values: dict[str, object] = {}

    @classmethod
    def about(cls, field: str, template: str, **values: object) -> RequestValidationError:
        assert field in WORDING, field
        error = cls(template.format(**WORDING, **values), field)
        error._template, error._values = template, values
        return error

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with the fields named as `names` maps them (unmapped ones keep the engine's words)."""
        if self._template is None:
            return str(self)
        return self._template.format(**{**WORDING, **names}, **self._values)

    def field_name(self, names: Mapping[str, str]) -> str | None:
        return None if self.field is None else names.get(self.field, WORDING[self.field])


class QueueFullError(EngineError):
    error_type = "overloaded"


class EngineStoppedError(EngineError):
    error_type = "unavailable"


class UnsupportedModelError(Exception):
    """The base model cannot be served exactly; raised at start-up."""


class ModelLoadError(Exception):
    """`--model` names something that cannot be loaded (missing, not a model, not cached offline)."""
