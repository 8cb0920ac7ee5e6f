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
        self.finished = False
        self._on_finish: list[Callable[[], None]] = []

    def add_finish_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop once the last event has arrived (at once if it already has)."""
        if self.finished:
            callback()
        else:
            self._on_finish.append(callback)

    def sink(self, event: TokenEvent) -> None:
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: TokenEvent) -> None:
        self._queue.put_nowait(event)
        if event.finish_reason is not None and not self.finished:
            self.finished = True
            for callback in self._on_finish:
                callback()
            self._on_finish.clear()

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
    engine: LLMEngine,
    prompt_ids: list[int],
    adapter: AdapterRef | None,
    params: SamplingParams,
    on_finish: Callable[[], None] | None = None,
) -> RequestStream:
    """Queue a request without blocking the event loop (an adapter miss reads the store).

    `on_finish` is registered before the engine sees the request, so it runs even when the request ends
    before this coroutine resumes."""
    stream = RequestStream(engine, asyncio.get_running_loop())
    if on_finish is not None:
        stream.add_finish_callback(on_finish)
    stream.seq = await asyncio.to_thread(engine.submit, prompt_ids, adapter, params, stream.sink)
    return stream
