"""The bridge from the engine thread to asyncio: one `RequestStream` per request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from prefixserve.engine.engine import AdapterRef, LLMEngine
from prefixserve.engine.sequence import SamplingParams, Sequence, TokenEvent


class RequestStream:
    """Async iterator over one request's `TokenEvent`s; the last one has a `finish_reason`."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.seq: Sequence | None = None
        self.on_finish: list[Callable[[], None]] = []  # run on the event loop when the last event arrives

    def sink(self, event: TokenEvent) -> None:
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: TokenEvent) -> None:
        self._queue.put_nowait(event)
        if event.finish_reason is not None:
            for callback in self.on_finish:
                callback()
            self.on_finish.clear()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await self._queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self.seq is not None and not self.seq.is_finished:
            self.engine.cancel(self.seq)


async def submit(
    engine: LLMEngine, prompt_ids: list[int], adapter: AdapterRef | None, params: SamplingParams
) -> RequestStream:
    """Queue a request without blocking the event loop (an adapter miss reads the store)."""
    stream = RequestStream(engine, asyncio.get_running_loop())
    stream.seq = await asyncio.to_thread(engine.submit, prompt_ids, adapter, params, stream.sink)
    return stream
