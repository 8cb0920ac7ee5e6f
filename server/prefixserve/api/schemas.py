"""Wire schemas: TGI/LoRAX generation and adapter management."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GenerateParameters(BaseModel):
    """TGI's `parameters`, with LoRAX's `adapter_id`. Unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(
        None, description="Adapter to serve; null = the base model. `a+b` composes."
    )
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=4)
    return_full_text: bool = False
    details: bool = False
    truncate: int | None = Field(
        None, ge=1, description="Keep only the last `truncate` tokens of the inputs."
    )
    decoder_input_details: bool = Field(False, description="Not supported; must be false.")
    # Sent by TGI/LoRAX clients, usually at their neutral values: accepted there, refused by name otherwise.
    best_of: int | None = Field(None, description="Not supported; must be null or 1.")
    typical_p: float | None = Field(None, description="Not supported; must be null or 1.0.")
    top_n_tokens: int | None = Field(None, description="Not supported; must be null or 0.")
    watermark: bool = Field(False, description="Not supported; must be false.")
    grammar: dict | None = Field(None, description="Not supported; must be null.")
    frequency_penalty: float | None = Field(None, description="Not supported; must be null or 0.")
    adapter_source: str | None = Field(
        None, description="Adapters come from this server's store; must be null."
    )
    api_token: str | None = Field(None, description="Ignored (LoRAX's hub token).")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> GenerateParameters:
        neutral = {
            "best_of": (None, 1),
            "typical_p": (None, 1.0),
            "top_n_tokens": (None, 0),
            "watermark": (False,),
            "grammar": (None,),
            "frequency_penalty": (None, 0.0),
            "decoder_input_details": (False,),
        }
        for name, allowed in neutral.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"parameters.{name} is not supported by this server; leave it out")
        if self.adapter_source is not None:
            raise ValueError(
                "parameters.adapter_source: adapters are served from this server's store only; upload the adapter "
                "with PUT /v1/adapters/{id} and leave adapter_source out"
            )
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class AdapterCreated(BaseModel):
    id: str
    num_virtual_tokens: int
    sha256: str
    size_bytes: int
