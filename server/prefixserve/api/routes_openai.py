"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models. `model` names the adapter."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from prefixserve.api.error_docs import EVENT_STREAM
from prefixserve.api.errors import APIError
from prefixserve.api.generation import Collected, collect, events, start
from prefixserve.api.openai_params import (
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    refuse,
    sampling_params,
)
from prefixserve.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
)
from prefixserve.api.streams import RequestStream
from prefixserve.engine.sequence import FinishReason, SamplingParams, TokenEvent

router = APIRouter(tags=["OpenAI-compatible"])

_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop"}


async def _start_all(
    request: Request,
    prompts: list[list[int]],
    model: str,
    params: SamplingParams,
    n: int,
    cache_salt: str | None = None,
) -> list[RequestStream]:
    """One engine request per prompt and choice; each counts against the tenant's concurrency limit."""
    limit = request.app.state.server.limiter.limit
    if len(prompts) * n > limit:
        raise refuse(
            "n",
            f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} generations, above this server's "
            f"{limit} per tenant (--max-concurrent-per-tenant); send fewer at once",
        )
    streams: list[RequestStream] = []
    try:
        for prompt_ids in prompts:
            for i in range(n):
                seeded = replace(params, seed=params.seed + i) if params.seed is not None else params
                streams.append(await start(request, prompt_ids, model, seeded, cache_salt))
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


def _usage_options(body: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    """A stream's usage reporting: (a last chunk with the whole usage, usage in every chunk too)."""
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    return include_usage, include_usage and bool(options and options.continuous_usage_stats)


async def _events_then_done(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's chunks, then `[DONE]`; an error mid-stream becomes one error event, in OpenAI's shape."""
    try:
        async with aclosing(chunks):  # a client gone: the chunks' generator ends now, cancelling its requests
            async for chunk in chunks:
                yield chunk
        yield _sse("[DONE]")
    except APIError as exc:
        yield _sse(json.dumps({"error": {"message": exc.message, "type": exc.error_type}}))


def _usage(prompts: list[list[int]], generated: int, streams: list[RequestStream] = ()) -> Usage:
    """Token counts; with several prompts or choices, `generated` counts them all. `cached_tokens`: the first
    choice's of each prompt (`streams` holds n choices per prompt, in order)."""
    prompt_tokens = sum(len(p) for p in prompts)
    n = len(streams) // len(prompts) if streams else 0
    cached = sum((s.seq.num_cached_tokens or 0) for s in streams[::n] if s.seq is not None) if n else 0
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=generated,
        total_tokens=prompt_tokens + generated,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _finish(reason: FinishReason | None) -> str | None:
    return _FINISH.get(reason) if reason is not None else None


# ----- /v1/completions -----------------------------------------------------------------------------------------
@router.post(
    "/v1/completions", response_model=Completion, response_model_exclude_none=True, responses=EVENT_STREAM
)
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions; `model` is the adapter id (or the base model's name for none)."""
    state = request.app.state.server
    for field, bad in (("best_of", (body.best_of or 1) > 1), ("suffix", body.suffix)):
        if bad:
            raise refuse(field, "not supported")
    prompts = await _prompts(state, body.prompt)
    if not prompts:
        raise refuse("prompt", "must not be an empty list")
    n_top = body.logprobs or 0
    scored = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    params = sampling_params(body, body.max_tokens, n_top, n_top if scored else None)
    streams = await _start_all(request, prompts, body.model, params, body.n, body.cache_salt)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_name
    echoes = [_prompt_text(state, body.prompt, p, i) for i, p in enumerate(prompts)] if body.echo else None
    choice_prompt = [i // body.n for i in range(len(streams))]  # which prompt each choice continues
    if body.stream:
        return StreamingResponse(
            _events_then_done(
                _stream_completions(streams, prompts, choice_prompt, echoes, rid, created, model, body)
            ),
            media_type="text/event-stream",
        )
    results = await _collect_all(streams, request)
    choices = []
    for i, r in enumerate(results):
        echo = echoes[choice_prompt[i]] if echoes else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(r.tokens, n_top, r.prompt if body.echo else ())
        choices.append(
            CompletionChoice(
                index=i, text=echo + r.text, finish_reason=_finish(r.finish_reason), logprobs=logprobs
            )
        )
    usage = _usage(prompts, sum(len(r.tokens) for r in results), streams)
    return Completion(id=rid, created=created, model=model, choices=choices, usage=usage)


async def _prompts(state, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await state.aencode(prompt, "prompt")]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [
        await state.aencode(p, f"prompt.{i}") if isinstance(p, str) else list(p) for i, p in enumerate(prompt)
    ]


def _prompt_text(state, prompt: str | list, ids: list[int], index: int) -> str:
    """What `echo` returns: the prompt as given, or its token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and index < len(prompt) and isinstance(prompt[index], str):
        return prompt[index]
    return state.loaded.tokenizer.decode(ids)


async def _stream_completions(
    streams: list[RequestStream],
    prompts: list[list[int]],
    choice_prompt: list[int],
    echoes: list[str] | None,
    rid: str,
    created: int,
    model: str,
    body: CompletionRequest,
) -> AsyncIterator[str]:
    include_usage, continuous = _usage_options(body)
    generated = 0
    echoed: set[int] = set()
    offsets = [0] * len(streams)

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _sse(
            Completion(id=rid, created=created, model=model, choices=choices, usage=usage).model_dump_json(
                exclude_none=True
            )
        )

    async for index, event in _merged(streams):
        generated += event.token_id >= 0
        text, logprobs = event.text_delta, None
        prompt_part = event.prompt if index not in echoed and body.echo else ()
        if echoes is not None and index not in echoed:  # the prompt goes first, with the first event
            echoed.add(index)
            text = echoes[choice_prompt[index]] + text
        if body.logprobs is not None:
            tokens = [event] if event.token_id >= 0 else []
            if tokens or prompt_part:
                logprobs = completion_logprobs(tokens, body.logprobs, prompt_part or (), offsets[index])
        offsets[index] += len(text)
        if not text and logprobs is None and event.finish_reason is None:
            continue
        choice = CompletionChoice(
            index=index, text=text, finish_reason=_finish(event.finish_reason), logprobs=logprobs
        )
        yield chunk([choice], _usage([prompts[choice_prompt[index]]], generated) if continuous else None)
    if include_usage:
        yield chunk([], _usage(prompts, generated, streams))


# ----- /v1/chat/completions ------------------------------------------------------------------------------------
@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    responses=EVENT_STREAM,
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions, using the tokenizer's chat template; `model` is the adapter id."""
    state = request.app.state.server
    if body.tools or body.tool_choice not in (None, "none"):
        raise refuse("tools", "tool calling is not supported")
    if body.top_logprobs and not body.logprobs:
        raise refuse("top_logprobs", "needs logprobs: true")
    messages = chat_messages(body.messages)
    chars = sum(len(m["content"]) for m in messages)
    state.check_chars(chars, state.engine.limits.max_input_tokens, "messages (all contents together)")
    prompt = await run_in_threadpool(state.encode_chat, messages)
    max_new = body.max_completion_tokens or body.max_tokens  # None: the server's default
    n_top = (body.top_logprobs or 0) if body.logprobs else 0
    params = sampling_params(body, max_new, n_top)
    streams = await _start_all(request, [prompt], body.model, params, body.n, body.cache_salt)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_name
    if body.stream:
        return StreamingResponse(
            _events_then_done(_stream_chat(streams, [prompt], rid, created, model, body)),
            media_type="text/event-stream",
        )
    results = await _collect_all(streams, request)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            finish_reason=_finish(r.finish_reason),
            logprobs=ChoiceLogprobs(content=chat_logprobs(r.tokens, n_top)) if body.logprobs else None,
        )
        for i, r in enumerate(results)
    ]
    usage = _usage([prompt], sum(len(r.tokens) for r in results), streams)
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=usage)


async def _stream_chat(
    streams: list[RequestStream],
    prompts: list[list[int]],
    rid: str,
    created: int,
    model: str,
    body: ChatCompletionRequest,
) -> AsyncIterator[str]:
    include_usage, continuous = _usage_options(body)
    n_top = (body.top_logprobs or 0) if body.logprobs else 0
    generated = 0

    def chunk(choices: list[dict], usage: Usage | None = None) -> str:
        out = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage.model_dump()
        return _sse(json.dumps(out))

    def running_usage() -> Usage | None:
        return _usage(prompts, generated) if continuous else None

    for i in range(len(streams)):
        delta = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield chunk([delta], running_usage())
    async for index, event in _merged(streams):
        generated += event.token_id >= 0
        logprobs = None
        if body.logprobs and event.token_id >= 0:
            logprobs = {"content": [e.model_dump() for e in chat_logprobs([event], n_top)]}
        if event.text_delta or logprobs is not None:
            choice = {"index": index, "delta": {"content": event.text_delta}, "finish_reason": None}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            yield chunk([choice], running_usage())
        if event.finish_reason is not None:
            yield chunk(
                [{"index": index, "delta": {}, "finish_reason": _finish(event.finish_reason)}],
                running_usage(),
            )
    if include_usage:
        yield chunk([], _usage(prompts, generated, streams))
