"""The bridge from the engine thread to asyncio: one `RequestStream` per request.

A step produces a token for every running row. Waking the event loop once per token (64 thread-safe calls
per step at 64 rows) cost the server a third of its throughput on two cores, where every wake-up takes time
from the engine's compute threads. Events therefore go through one `EventDispatcher` per event loop, which
wakes the loop once for whatever the engine has posted since its last wake-up: about once per step. A request
whose answer is sent whole (not streamed) holds its events on the engine thread until its last one: the loop
is not woken, nor its handler resumed, once per token for nothing.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable

from prefixserve.adapters.ids import AdapterRef
from prefixserve.engine.cpu.threads import single_threaded
from prefixserve.engine.engine import LLMEngine
from prefixserve.engine.sequence import SamplingParams, Sequence, TokenEvent


class EventDispatcher:
    """Hands events from the engine thread to their streams on the event loop, one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: deque[tuple[RequestStream, TokenEvent]] = deque()
        self._scheduled = False

    def post(self, stream: RequestStream, events: list[TokenEvent]) -> None:
        """Engine thread. deque.extend is atomic; a flush that already started schedules no lost event,
        because it clears the flag before draining."""
        self._pending.extend((stream, event) for event in events)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending:
            stream, event = self._pending.popleft()
            stream._deliver(event)


_dispatchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventDispatcher] = (
    weakref.WeakKeyDictionary()
)


def dispatcher_for(loop: asyncio.AbstractEventLoop) -> EventDispatcher:
    dispatcher = _dispatchers.get(loop)
    if dispatcher is None:
        dispatcher = _dispatchers[loop] = EventDispatcher(loop)
    return dispatcher


class RequestStream:
    """Async iterator over one request's `TokenEvent`s; the last one has a `finish_reason`."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self._dispatcher = dispatcher_for(loop)
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.seq: Sequence | None = None
        self.finished = False
        self._on_finish: list[Callable[[], None]] = []
        self._hold = False
        self._held: list[TokenEvent] = []

    def add_finish_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop once the last event has arrived (at once if it already has)."""
        if self.finished:
            callback()
        else:
            self._on_finish.append(callback)

    def hold_until_finished(self) -> None:
        """From now on, events reach the iterator all at once, with the last one (a whole, unstreamed answer)."""
        self._hold = True

    def sink(self, event: TokenEvent) -> None:
        """Engine thread."""
        if self._hold and event.finish_reason is None:
            self._held.append(event)
            return
        held, self._held = self._held, []
        self._dispatcher.post(self, [*held, event])

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
    tenant: str | None = None,
    cache_salt: str | None = None,
) -> RequestStream:
    """Queue a request without blocking the event loop (an adapter miss reads the store).

    `on_finish` is registered before the engine sees the request, so it runs even when the request ends
    before this coroutine resumes."""
    stream = RequestStream(engine, asyncio.get_running_loop())
    if on_finish is not None:
        stream.add_finish_callback(on_finish)
    stream.seq = await asyncio.to_thread(  # it may load the adapter: torch ops, kept off the engine's threads
        single_threaded(engine.submit), prompt_ids, adapter, params, stream.sink, tenant, cache_salt
    )
    return stream
