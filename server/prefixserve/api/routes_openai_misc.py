"""The rest of the OpenAI/vLLM surface: models (list and one), and vLLM's /tokenize, /detokenize and
/tokenizer_info (what lm-evaluation-harness's remote tokenizer backend reads)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from prefixserve.adapters.errors import AdapterNotFoundError
from prefixserve.api.errors import APIError
from prefixserve.api.generation import adapter_ref
from prefixserve.api.openai_params import chat_messages, refuse
from prefixserve.api.openai_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["OpenAI-compatible"])


def _base_card(state) -> ModelCard:
    return ModelCard(
        id=state.model_name,
        created=int(state.started_at),
        owned_by="prefixserve",
        max_model_len=state.max_model_len,
    )


def _adapter_card(state, tenant: str, info) -> ModelCard:
    return ModelCard(
        id=info.adapter_id,
        created=int(info.created_at),
        owned_by=tenant,
        root=info.adapter_id,
        parent=state.model_name,
        max_model_len=state.max_model_len - info.num_virtual_tokens,
        method=info.method,
        num_virtual_tokens=info.num_virtual_tokens,
    )


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
def models(request: Request) -> ModelList:
    """The base model and the calling tenant's adapters (use an adapter's id as `model`)."""
    state = request.app.state.server
    tenant = state.namespace(request)
    return ModelList(
        data=[_base_card(state)] + [_adapter_card(state, tenant, i) for i in state.store.list(tenant)]
    )


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, response_model_exclude_none=True)
def model(model_id: str, request: Request) -> ModelCard:
    """One model: the base model's name, or one of the calling tenant's adapters."""
    state = request.app.state.server
    if model_id == state.model_name:
        return _base_card(state)
    tenant = state.namespace(request)
    try:
        return _adapter_card(state, tenant, state.store.info(tenant, model_id))
    except AdapterNotFoundError as exc:
        raise APIError(404, f"model {model_id!r} does not exist: {exc}", "not_found") from exc


def _check_model(request: Request, model: str) -> None:
    """`model` must name the base model or adapters that exist: tokenizing does not depend on it, but a
    client sending the wrong name learns it here rather than at generation."""
    state = request.app.state.server
    ref = adapter_ref(model, state.namespace(request), (state.model_name,))
    for adapter_id in ref[1] if ref else ():
        state.store.info(ref[0], adapter_id)  # AdapterNotFoundError -> 404


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """vLLM's: the token ids of a prompt, or of chat messages through the chat template."""
    state = request.app.state.server
    await run_in_threadpool(_check_model, request, body.model)  # reads the store: S3 may take a while
    if (body.prompt is None) == (body.messages is None):
        raise refuse("prompt/messages", "give exactly one of them")
    if body.prompt is not None:
        state.check_chars(len(body.prompt), state.engine.limits.max_input_tokens, "prompt")
        tokenizer = state.loaded.tokenizer
        ids = await run_in_threadpool(
            tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens
        )
    else:
        messages = chat_messages(body.messages)
        chars = sum(len(m["content"]) for m in messages)
        state.check_chars(chars, state.engine.limits.max_input_tokens, "messages (all contents together)")
        ids = await run_in_threadpool(state.encode_chat, messages)
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=list(ids))


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """vLLM's: the text of token ids."""
    state = request.app.state.server
    await run_in_threadpool(_check_model, request, body.model)
    vocab = state.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise refuse("tokens", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return DetokenizeResponse(prompt=state.loaded.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info")
def tokenizer_info(request: Request) -> dict[str, Any]:
    """vLLM's: the tokenizer's configuration (its init arguments less file paths, the special tokens as
    text), its class and chat template, so a client can tokenize like the server without a local copy."""
    tokenizer = request.app.state.server.loaded.tokenizer
    info = {
        k: _plain(v) for k, v in tokenizer.init_kwargs.items() if not k.endswith(("_file", "name_or_path"))
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            info[name] = str(token)
    info["tokenizer_class"] = type(tokenizer).__name__
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return info


def _plain(value: Any) -> Any:
    """JSON-ready: AddedToken as its text, containers element by element, anything else unknown as str."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
