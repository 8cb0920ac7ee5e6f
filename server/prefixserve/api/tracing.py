"""OpenTelemetry traces of generation requests, built after the fact from the engine's timestamps.

Imported only when --otlp-traces-endpoint is set: without it the SDK is never loaded and a request costs one
`is None` check. The engine knows nothing of HTTP or OpenTelemetry; it stamps each `Sequence` with
time.monotonic() at its events (adapter lookup, arrival, first admission, first token, finish). Once the
response has been sent, `TracingMiddleware` makes the request's span, continuing the caller's trace from its
`traceparent` header, and a child span per phase of each engine request, their times moved to the epoch by
one offset taken at start-up. Nothing is timed twice, and the step loop never waits on a span.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import Request
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixserve import __version__
from prefixserve.adapters.ids import COMPOSE_SEPARATOR, AdapterRef
from prefixserve.engine.sequence import FinishReason, Sequence

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "prefixserve"
FLUSH_SECONDS = 5.0  # the most that sending the last spans may add to a shutdown
_OPERATIONS = {"/v1/chat/completions": "chat"}  # every other generation route completes text


def traces_url(endpoint: str) -> str:
    """The receiver's URL: a collector's address without a path gets OTLP/HTTP's /v1/traces."""
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


@dataclass
class _Tracked:
    seq: Sequence
    adapter: AdapterRef | None
    prompt_key: int  # id() of the prompt's token list: the n choices of one prompt count its tokens once


@dataclass
class RequestTrace:
    """What one generation request leaves for its spans: filled by the middleware and `Tracing.track`."""

    start: float  # time.monotonic()
    tracked: list[_Tracked] = field(default_factory=list)
    status: int = 0
    exception: BaseException | None = None


class Tracing:
    def __init__(self, endpoint: str, model_name: str) -> None:
        detected = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over ours
        ours: dict[str, str] = {}
        if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            ours[SERVICE_NAME] = DEFAULT_SERVICE_NAME
        if SERVICE_VERSION not in detected.attributes:
            ours[SERVICE_VERSION] = __version__
        resource = detected.merge(Resource(ours))
        self.url = traces_url(endpoint)
        # Not the global provider: FastAPI's own telemetry would start tracing every route too. Flushed by
        # `shutdown` in the app's lifespan, with a bound, rather than at exit.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url)))
        self.tracer = self.provider.get_tracer("prefixserve", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.model_name = model_name
        self._epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        log.info("OpenTelemetry tracing on: spans of %s to %s", resource.attributes[SERVICE_NAME], self.url)

    def shutdown(self, timeout: float = FLUSH_SECONDS) -> None:
        """Send the spans still batched, waiting at most `timeout`: with the receiver down, the exporter's
        retries would hold the exit for 7 s or more per batch (measured with 1.45)."""
        flush = threading.Thread(target=self.provider.shutdown, name="prefixserve-trace-flush", daemon=True)
        flush.start()
        flush.join(timeout)
        if flush.is_alive():
            log.warning("spans not sent within %.0f s of shutdown were dropped; is %s up?", timeout, self.url)

    def track(self, request: Request, seq: Sequence, adapter: AdapterRef | None, prompt: list[int]) -> None:
        """Attach an engine request to the HTTP request's trace (a request with n choices has n)."""
        trace = request.scope.get("state", {}).get("trace")
        if trace is not None:
            trace.tracked.append(_Tracked(seq, adapter, id(prompt)))

    def _ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self._epoch_offset_ns

    def _span(self, name: str, parent: Context, start: float, end: float, attributes: dict) -> Span:
        span = self.tracer.start_span(name, parent, start_time=self._ns(start), attributes=attributes)
        span.end(end_time=self._ns(end))
        return span

    def export(self, trace: RequestTrace, scope: Scope, route: str) -> None:
        """The request's span and its children, now that the response is sent."""
        end = time.monotonic()
        state = scope.get("state", {})
        principal = state.get("principal")
        span = self.tracer.start_span(
            f"{scope['method']} {route}",
            self.propagator.extract(Headers(scope=scope)),
            kind=SpanKind.SERVER,
            start_time=self._ns(trace.start),
            attributes={
                "http.request.method": scope["method"],
                "http.route": route,
                "http.response.status_code": trace.status,
                "gen_ai.operation.name": _OPERATIONS.get(route, "text_completion"),
                "prefixserve.request_id": state.get("request_id", ""),
                "prefixserve.tenant": principal.tenant if principal is not None else "",
            },
        )
        if not span.is_recording():  # the caller's trace is not sampled, or the sampler said no
            return
        seqs = [t.seq for t in trace.tracked]
        if trace.tracked:
            adapters = {t.adapter for t in trace.tracked}
            names = sorted({self._model(a) for a in adapters})
            prompts = {t.prompt_key: t.seq.num_prompt_tokens for t in trace.tracked}
            span.set_attributes(
                {
                    "gen_ai.request.model": names[0] if len(names) == 1 else ",".join(names),
                    "gen_ai.request.max_tokens": seqs[0].params.max_new_tokens or 0,
                    "gen_ai.usage.input_tokens": sum(prompts.values()),
                    "gen_ai.usage.output_tokens": sum(len(s.output_ids) for s in seqs),
                    "gen_ai.response.finish_reasons": [_reason(s) for s in seqs],
                    "prefixserve.adapter.ids": sorted({i for a in adapters if a is not None for i in a[1]}),
                }
            )
        parent = set_span_in_context(span)
        for index, tracked in enumerate(trace.tracked):
            self._phases(parent, tracked, index, end)
        self._set_status(span, trace, state, seqs)
        span.end(end_time=self._ns(end))

    def _model(self, adapter: AdapterRef | None) -> str:
        return COMPOSE_SEPARATOR.join(adapter[1]) if adapter is not None else self.model_name

    def _phases(self, parent: Context, tracked: _Tracked, index: int, end: float) -> None:
        """adapter_load, queue, prefill, decode: the spans of the phases the engine request reached."""
        seq, adapter = tracked.seq, tracked.adapter
        finish = seq.finish_time or end  # unfinished: the client went away and the cancel is under way
        common = {"prefixserve.choice": index}
        if adapter is not None and seq.adapter_load_start is not None and seq.adapter_load_end is not None:
            ids = {"prefixserve.adapter.ids": list(adapter[1])}
            self._span("adapter_load", parent, seq.adapter_load_start, seq.adapter_load_end, common | ids)
        queued_until = seq.admitted_time or finish
        preempted = {"prefixserve.preemptions": seq.num_preemptions}
        self._span("queue", parent, seq.arrival_time, queued_until, common | preempted)
        if seq.admitted_time is None:
            return
        prefilled_at = seq.first_token_time or finish  # no token: it scored its prompt only, or failed
        prompt = {"gen_ai.usage.input_tokens": seq.num_prompt_tokens}
        self._span("prefill", parent, seq.admitted_time, prefilled_at, common | prompt)
        if seq.first_token_time is not None:
            output = {
                "gen_ai.usage.output_tokens": len(seq.output_ids),
                "gen_ai.response.finish_reasons": [_reason(seq)],
            }
            self._span("decode", parent, seq.first_token_time, finish, common | output)

    @staticmethod
    def _set_status(span: Span, trace: RequestTrace, state: dict, seqs: list[Sequence]) -> None:
        if trace.exception is not None:
            span.record_exception(trace.exception)
            span.set_attribute("error.type", type(trace.exception).__qualname__)
            span.set_status(Status(StatusCode.ERROR, str(trace.exception)))
        elif trace.status >= 400:
            error_type, message = state.get("error", (str(trace.status), f"HTTP {trace.status}"))
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, message))
        elif any(s.finish_reason is FinishReason.ERROR for s in seqs):  # failed after a streamed 200
            span.set_attribute("error.type", "generation")
            span.set_status(Status(StatusCode.ERROR, "generation failed"))


def _reason(seq: Sequence) -> str:
    return seq.finish_reason.value if seq.finish_reason is not None else "unfinished"


class TracingMiddleware:
    """Times each POST to a generation route and exports its trace once the response is sent. It runs after
    authentication: a request refused for its key leaves no span."""

    def __init__(self, app: ASGIApp, tracing: Tracing, routes: Collection[str]) -> None:
        self.app = app
        self.tracing = tracing
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["path"].removeprefix(scope.get("root_path", "")) if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope["method"] != "POST" or route not in self.routes:
            await self.app(scope, receive, send)
            return
        trace = RequestTrace(time.monotonic())
        scope.setdefault("state", {})["trace"] = trace

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                trace.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except BaseException as exc:
            trace.exception = exc
            raise
        finally:
            try:
                self.tracing.export(trace, scope, route)
            except Exception:  # a tracing bug must not turn a served request into an error
                log.exception("building the trace of %s failed", route)
