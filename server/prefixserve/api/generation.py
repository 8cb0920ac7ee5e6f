"""Shared request plumbing for all generation endpoints: adapter choice, sampling, collecting, disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from prefixserve.adapters.ids import parse_adapter_spec
from prefixserve.api.errors import APIError
from prefixserve.engine.engine import AdapterRef, LLMEngine
from prefixserve.engine.sequence import FinishReason, SamplingParams, TokenEvent
from prefixserve.engine.streams import RequestStream, submit

DEFAULT_NAMESPACE = "default"
_DISCONNECT_POLL_SECONDS = 0.25


def adapter_ref(
    spec: str | None, namespace: str, base_model_names: tuple[str, ...] = ()
) -> AdapterRef | None:
    """`None`, `""` or the base model's name mean no adapter; `a+b` composes."""
    if spec is None or spec == "" or spec in base_model_names:
        return None
    return namespace, parse_adapter_spec(spec)


@dataclass
class Collected:
    events: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if e.token_id >= 0]


async def start(
    engine: LLMEngine, prompt: str, adapter: AdapterRef | None, params: SamplingParams
) -> tuple[RequestStream, list[int]]:
    prompt_ids = engine.loaded.tokenizer.encode(prompt)
    return await submit(engine, prompt_ids, adapter, params), prompt_ids


async def events(stream: RequestStream) -> AsyncIterator[TokenEvent]:
    """The stream's events; a generation error becomes a 424 before any output, else ends the stream."""
    async for event in stream:
        if event.finish_reason is FinishReason.ERROR:
            raise APIError(424, event.error or "generation failed", "generation")
        yield event


async def collect(stream: RequestStream, request: Request) -> Collected:
    """Run a request to the end, cancelling it if the client disconnects meanwhile."""
    out = Collected()

    async def consume() -> None:
        async for event in events(stream):
            out.events.append(event)
            out.text += event.text_delta
            if event.finish_reason is not None:
                out.finish_reason = event.finish_reason

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if not done and await request.is_disconnected():
                stream.cancel()
                task.cancel()
                raise APIError(499, "client disconnected", "cancelled")
        task.result()
    finally:
        if not task.done():
            task.cancel()
        stream.cancel()
    return out
