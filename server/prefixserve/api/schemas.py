"""Wire schemas: TGI/LoRAX generation and adapter management."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from prefixserve.engine.prefix_cache import MAX_CACHE_SALT_CHARS
from prefixserve.engine.sequence import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOTAL_CHARS,
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_RANGE,
)

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str) -> str:
    """JSON may escape half of a UTF-16 pair (`"\\ud800"`); such a string is not Unicode text, and a
    tokenizer cannot take it."""
    if _LONE_SURROGATE.search(text):
        raise ValueError("holds a lone surrogate (e.g. \\ud800), which is not valid Unicode; send UTF-8 text")
    return text


Text = Annotated[str, AfterValidator(check_text)]
StopText = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class Grammar(BaseModel):
    """TGI's `grammar`: `{"type": "json", "value": <JSON schema>}` or `{"type": "regex", "value": "..."}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "regex"]
    value: Any = Field(
        description="A JSON schema (object or JSON text) for `json`, a regular expression for `regex`."
    )


class ResponseFormat(BaseModel):
    """LoRAX's `response_format`: `{"type": "json_object", "schema": <JSON schema>}` (`schema` optional: any
    JSON object), or `json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_object", "json_schema", "text"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class GenerateParameters(BaseModel):
    """TGI's `parameters`, with LoRAX's additions. Unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(
        None, description="Adapter to serve; null = the base model. `a+b` composes."
    )
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracts penalty x count of each token in the output so far."
    )
    seed: int | None = Field(None, ge=0, lt=2**63)
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CACHE_SALT_CHARS,
        description="Share cached prompt blocks only with requests of the same tenant and the same salt.",
    )
    stop: list[StopText] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description=f"Up to {MAX_STOP_SEQUENCES} strings of 1-{MAX_STOP_CHARS} characters, "
        f"{MAX_STOP_TOTAL_CHARS} characters in all.",
    )
    return_full_text: bool = False
    details: bool = False
    truncate: int | None = Field(
        None, ge=1, description="Keep only the last `truncate` tokens of the inputs."
    )
    decoder_input_details: bool = Field(
        False,
        description="With details: the prompt's tokens and their log-probabilities in `details.prefill`.",
    )
    top_n_tokens: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="With details: the n most likely tokens at each step (`top_tokens`).",
    )
    return_k_alternatives: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="LoRAX: the k most likely tokens in each token's `alternative_tokens`.",
    )
    ignore_eos_token: bool = Field(False, description="LoRAX: keep generating past end-of-sequence.")
    grammar: Grammar | None = Field(
        None, description="TGI: constrain the output to a JSON schema or a regex."
    )
    response_format: ResponseFormat | None = Field(
        None, description="LoRAX: constrain the output to JSON (a schema, or any object)."
    )
    # Sent by TGI/LoRAX clients, usually at their neutral values: accepted there, refused by name otherwise.
    best_of: int | None = Field(None, description="Not supported; must be null or 1.")
    typical_p: float | None = Field(None, description="Not supported; must be null or 1.0.")
    watermark: bool = Field(False, description="Not supported; must be false.")
    merged_adapters: dict | None = Field(
        None, description="LoRAX's LoRA merging; must be null (compose prefixes with `a+b` in adapter_id)."
    )
    adapter_source: str | None = Field(
        None, description="Adapters come from this server's store; must be null."
    )
    api_token: str | None = Field(None, description="Ignored (LoRAX's hub token).")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> GenerateParameters:
        neutral = {"best_of": (None, 1), "typical_p": (None, 1.0), "watermark": (False,)}
        for name, allowed in neutral.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"parameters.{name} is not supported by this server; leave it out")
        if self.merged_adapters is not None:
            raise ValueError(
                "parameters.merged_adapters: prefix adapters are not merged; compose them with adapter_id 'a+b'"
            )
        if self.adapter_source is not None:
            raise ValueError(
                "parameters.adapter_source: adapters are served from this server's store only; upload the adapter "
                "with PUT /v1/adapters/{id} and leave adapter_source out"
            )
        if self.grammar is not None and self.response_format is not None:
            raise ValueError("give parameters.grammar or parameters.response_format, not both")
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Text
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # null for the first: nothing predicts it


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None


class Details(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class AdapterCreated(BaseModel):
    """What an upload stored, read from the store's `AdapterInfo` by attribute."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(validation_alias="adapter_id")
    method: str  # prefix-tuning, cartridge, prompt-tuning or p-tuning
    num_virtual_tokens: int
    sha256: str
    size_bytes: int
