"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models. `model` names the adapter."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from prefixserve.api.errors import APIError
from prefixserve.api.generation import Collected, collect, events, start
from prefixserve.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenLogprob,
    Usage,
    _SamplingFields,
)
from prefixserve.engine.sequence import FinishReason, SamplingParams, TokenEvent
from prefixserve.engine.streams import RequestStream

router = APIRouter(tags=["OpenAI-compatible"])

_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop"}


def _refuse(field: str, why: str) -> APIError:
    return APIError(422, f"{field}: {why}", "validation")


def sampling_params(body: _SamplingFields, max_new_tokens: int | None) -> SamplingParams:
    if body.presence_penalty or body.frequency_penalty:
        raise _refuse("presence_penalty/frequency_penalty", "not supported; use repetition_penalty")
    if body.logit_bias:
        raise _refuse("logit_bias", "not supported")
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(stop),
    )


async def _start_all(
    request: Request, prompts: list[list[int]], model: str, params: SamplingParams, n: int
) -> list[RequestStream]:
    """One engine request per prompt and choice; each counts against the tenant's concurrency limit."""
    limit = request.app.state.server.limiter.limit
    if len(prompts) * n > limit:
        raise _refuse(
            "n",
            f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} generations, above this server's "
            f"{limit} per tenant (--max-concurrent-per-tenant); send fewer at once",
        )
    streams: list[RequestStream] = []
    try:
        for prompt_ids in prompts:
            for i in range(n):
                seeded = replace(params, seed=params.seed + i) if params.seed is not None else params
                streams.append(await start(request, prompt_ids, model, seeded))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


async def _collect_all(streams: list[RequestStream], request: Request) -> list[Collected]:
    try:
        return await asyncio.gather(*(collect(s, request) for s in streams))
    finally:  # when one choice fails, the others stop too instead of running on for nobody
        for stream in streams:
            stream.cancel()


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of several streams as they come, tagged with the stream's index."""
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for event in events(stream):
                await queue.put((index, event))
            await queue.put((index, None))
        except BaseException as exc:  # forwarded to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _usage(prompts: list[list[int]], generated: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated
    )


def _finish(reason: FinishReason | None) -> str | None:
    return _FINISH.get(reason) if reason is not None else None


# ----- /v1/completions -----------------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=Completion, response_model_exclude_none=True)
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions; `model` is the adapter id (or the base model's name for none)."""
    state = request.app.state.server
    for field, bad in (("echo", body.echo), ("best_of", (body.best_of or 1) > 1), ("suffix", body.suffix)):
        if bad:
            raise _refuse(field, "not supported")
    prompts = await _prompts(state, body.prompt)
    if not prompts:
        raise _refuse("prompt", "must not be an empty list")
    params = sampling_params(body, body.max_tokens)
    streams = await _start_all(request, prompts, body.model, params, body.n)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream_completions(
                streams, prompts, rid, created, model, include_usage, body.logprobs is not None
            ),
            media_type="text/event-stream",
        )
    results = await _collect_all(streams, request)
    choices = [
        CompletionChoice(
            index=i,
            text=r.text,
            finish_reason=_finish(r.finish_reason),
            logprobs=_completion_logprobs(r.tokens) if body.logprobs is not None else None,
        )
        for i, r in enumerate(results)
    ]
    usage = _usage(prompts, sum(len(r.tokens) for r in results))
    return Completion(id=rid, created=created, model=model, choices=choices, usage=usage)


async def _prompts(state, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await state.aencode(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [await state.aencode(p) if isinstance(p, str) else list(p) for p in prompt]


def _completion_logprobs(tokens: list[TokenEvent]) -> CompletionLogprobs:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token_text)
    return CompletionLogprobs(
        tokens=[t.token_text for t in tokens], token_logprobs=[t.logprob for t in tokens], text_offset=offsets
    )


async def _stream_completions(
    streams: list[RequestStream],
    prompts: list[list[int]],
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[str]:
    generated = 0
    try:
        async for index, event in _merged(streams):
            generated += event.token_id >= 0
            if not event.text_delta and event.finish_reason is None:
                continue
            choice = CompletionChoice(
                index=index,
                text=event.text_delta,
                finish_reason=_finish(event.finish_reason),
                logprobs=_completion_logprobs([event]) if logprobs and event.token_id >= 0 else None,
            )
            chunk = Completion(id=rid, created=created, model=model, choices=[choice])
            yield _sse(chunk.model_dump_json(exclude_none=True))
        if include_usage:
            chunk = Completion(
                id=rid, created=created, model=model, choices=[], usage=_usage(prompts, generated)
            )
            yield _sse(chunk.model_dump_json(exclude_none=True))
        yield _sse("[DONE]")
    except APIError as exc:
        yield _sse(json.dumps({"error": {"message": exc.message, "type": exc.error_type}}))


# ----- /v1/chat/completions ------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions, using the tokenizer's chat template; `model` is the adapter id."""
    state = request.app.state.server
    if body.tools or body.tool_choice not in (None, "none"):
        raise _refuse("tools", "tool calling is not supported")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise _refuse("response_format", "only {'type': 'text'} is supported")
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise _refuse(f"messages.{i}.content", "only text parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": message.role, "content": content or ""})
    prompt = await run_in_threadpool(state.encode_chat, messages)
    max_new = (
        body.max_completion_tokens or body.max_tokens
    )  # None: the server's default, within the room left
    params = sampling_params(body, max_new)
    streams = await _start_all(request, [prompt], body.model, params, body.n)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream_chat(streams, [prompt], rid, created, model, include_usage),
            media_type="text/event-stream",
        )
    results = await _collect_all(streams, request)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            finish_reason=_finish(r.finish_reason),
            logprobs=ChoiceLogprobs(
                content=[TokenLogprob(token=t.token_text, logprob=t.logprob) for t in r.tokens]
            )
            if body.logprobs
            else None,
        )
        for i, r in enumerate(results)
    ]
    usage = _usage([prompt], sum(len(r.tokens) for r in results))
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=usage)


async def _stream_chat(
    streams: list[RequestStream],
    prompts: list[list[int]],
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict], usage: Usage | None = None) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage.model_dump()
        return _sse(json.dumps(body))

    generated = 0
    try:
        for i in range(len(streams)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for index, event in _merged(streams):
            generated += event.token_id >= 0
            if event.text_delta:
                yield chunk([{"index": index, "delta": {"content": event.text_delta}, "finish_reason": None}])
            if event.finish_reason is not None:
                yield chunk([{"index": index, "delta": {}, "finish_reason": _finish(event.finish_reason)}])
        if include_usage:
            yield chunk([], _usage(prompts, generated))
        yield _sse("[DONE]")
    except APIError as exc:
        yield _sse(json.dumps({"error": {"message": exc.message, "type": exc.error_type}}))


# ----- /v1/models ----------------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
def models(request: Request) -> ModelList:
    """The base model and the calling tenant's adapters (use an adapter's id as `model`)."""
    state = request.app.state.server
    cards = [ModelCard(id=state.model_name, created=int(state.started_at), owned_by="prefixserve")]
    for info in state.store.list(state.namespace(request)):
        cards.append(
            ModelCard(
                id=info.adapter_id,
                created=int(info.created_at),
                owned_by=state.namespace(request),
                root=info.adapter_id,
                parent=state.model_name,
            )
        )
    return ModelList(data=cards)
