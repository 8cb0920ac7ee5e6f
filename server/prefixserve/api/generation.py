"""Shared request plumbing for all generation endpoints: adapter choice, tenant limits, collecting, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from prefixserve.adapters.ids import AdapterRef, parse_adapter_spec
from prefixserve.api.errors import APIError
from prefixserve.api.streams import RequestStream, submit
from prefixserve.engine.sequence import FinishReason, GrammarSpec, PromptToken, SamplingParams, TokenEvent

_DISCONNECT_POLL_SECONDS = 0.25


class TenantLimiter:
    """At most `limit` requests per tenant in flight, so one tenant cannot take every batch row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: Counter[str] = Counter()

    def acquire(self, tenant: str) -> None:
        if self.in_flight[tenant] >= self.limit:
            raise APIError(
                429,
                f"tenant '{tenant}' already has {self.limit} requests in flight (--max-concurrent-per-tenant); "
                "retry when one finishes",
                "overloaded",
                {"Retry-After": "1"},
            )
        self.in_flight[tenant] += 1

    def release(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1
        if self.in_flight[tenant] <= 0:
            del self.in_flight[tenant]


def adapter_ref(
    spec: str | None, namespace: str, base_model_names: tuple[str, ...] = ()
) -> AdapterRef | None:
    """`None`, `""` or the base model's name mean no adapter; `a+b` composes."""
    if spec is None or spec == "" or spec in base_model_names:
        return None
    return namespace, parse_adapter_spec(spec)


async def start(
    request: Request,
    prompt_ids: list[int],
    adapter_spec: str | None,
    params: SamplingParams,
    cache_salt: str | None = None,
) -> RequestStream:
    """Queue one generation for the calling tenant; its tenant slot is freed when it ends, however it ends."""
    state = request.app.state.server
    tenant = state.namespace(request)
    if state.draining:
        raise APIError(
            503,
            "the server is draining for shutdown; retry on another replica",
            "unavailable",
            {"Retry-After": "1"},
        )
    adapter = adapter_ref(adapter_spec, tenant, (state.model_name,))
    state.limiter.acquire(tenant)
    released = False

    def release() -> None:  # once, whichever comes first: the finish event or a refusal
        nonlocal released
        if not released:
            released = True
            state.limiter.release(tenant)

    try:
        stream = await submit(state.engine, prompt_ids, adapter, params, release, tenant, cache_salt)
    except BaseException:
        release()
        raise
    if state.tracing is not None:
        state.tracing.track(request, stream.seq, adapter, prompt_ids)
    return stream


@dataclass
class Collected:
    events: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if e.token_id >= 0]

    @property
    def prompt(self) -> tuple[PromptToken, ...]:
        """The prompt's tokens with their log-probabilities, when they were asked for."""
        return next((e.prompt for e in self.events if e.prompt is not None), ())


def grammar_spec(kind: str, value: Any = None) -> GrammarSpec:
    """A request's grammar: `value` is a JSON schema (a dict, or its JSON text) or a regex, as `kind` says."""
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    return GrammarSpec(kind, value or "")


async def events(stream: RequestStream) -> AsyncIterator[TokenEvent]:
    """The stream's events; a generation error raises APIError(424)."""
    async for event in stream:
        if event.finish_reason is FinishReason.ERROR:
            raise APIError(424, event.error or "generation failed", "generation")
        yield event


async def collect(stream: RequestStream, request: Request) -> Collected:
    """Run a request to the end, cancelling it if the client disconnects meanwhile."""
    out = Collected()
    stream.hold_until_finished()

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
                raise APIError(499, "client disconnected", "cancelled")
        task.result()
    finally:
        if not task.done():
            task.cancel()
        stream.cancel()
    return out
