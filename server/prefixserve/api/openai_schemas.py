"""OpenAI-compatible request/response schemas (completions, chat completions, models)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from prefixserve.api.schemas import StopText, Text
from prefixserve.engine.prefix_cache import MAX_CACHE_SALT_CHARS
from prefixserve.engine.sequence import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOTAL_CHARS,
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_RANGE,
)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="vLLM: usage in every chunk (with include_usage)."
    )


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema"}}` or text."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "", description="An adapter id (or `a+b`); the base model's name or '' for no adapter."
    )
    temperature: float | None = Field(
        None,
        ge=0,
        le=TEMPERATURE_RANGE[1],
        description=f"0 = greedy; else at least {TEMPERATURE_RANGE[0]}; default 1.0 (sampling).",
    )
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="Extension (as vLLM): keep the k most likely tokens.")
    repetition_penalty: float | None = Field(
        None,
        ge=REPETITION_PENALTY_RANGE[0],
        le=REPETITION_PENALTY_RANGE[1],
        description="Extension (as vLLM).",
    )
    n: int = Field(1, ge=1, le=8)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopText | list[StopText] | None = Field(
        None,
        max_length=MAX_STOP_SEQUENCES,
        description=f"Up to {MAX_STOP_SEQUENCES} strings of 1-{MAX_STOP_CHARS} characters, "
        f"{MAX_STOP_TOTAL_CHARS} characters in all.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Token id (as a string) to a bias in [-100, 100] added to its logit."
    )
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions (what `vllm bench serve`, guidellm and lm-eval send)
    ignore_eos: bool = Field(False, description="Extension (as vLLM): keep generating past end-of-sequence.")
    min_tokens: int = Field(0, ge=0, description="Extension (as vLLM): no stop before this many tokens.")
    stop_token_ids: list[int] | None = Field(None, description="Extension (as vLLM): token ids that stop.")
    include_stop_str_in_output: bool = Field(False, description="Extension (as vLLM).")
    skip_special_tokens: bool = Field(True, description="Extension (as vLLM).")
    guided_json: dict[str, Any] | str | None = Field(None, description="Extension (as vLLM): a JSON schema.")
    guided_regex: str | None = Field(None, description="Extension (as vLLM): a regular expression.")
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CACHE_SALT_CHARS,
        description="Extension (as vLLM): requests share cached prompt blocks only with requests of the same tenant and the same salt.",
    )
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(description="Text, texts, or token ids.")
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="The chosen tokens' log-probabilities and the n most likely."
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: scored).")
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: the n most likely."
    )
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose keys/values came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    # vLLM's field: the tokens of context a request has (prompt and new tokens together); for an adapter,
    # max_total_tokens less its virtual tokens.
    max_model_len: int | None = None
    # prefixserve's: an adapter's kind (prefix-tuning, cartridge, prompt-tuning, p-tuning) and virtual tokens.
    method: str | None = None
    num_virtual_tokens: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's `POST /tokenize`: a `prompt`, or chat `messages` (with the chat template applied)."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
