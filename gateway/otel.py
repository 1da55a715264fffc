"""Spans exported over OTLP/HTTP with the OpenTelemetry SDK (``tracing:`` configured).

Imported only by ``gateway.tracing.start`` when tracing is configured, so a
gateway without ``tracing:`` never loads the SDK.

Per request:

    gateway <route>     SERVER span, the child of the caller's traceparent (if a
                        valid one came) or a new trace; its attributes are the
                        walk's decision (route, caller, errorCode, reason, status)
    └── upstream <route>  CLIENT span around the upstream exchange, retries
                        included; upstream receives this span's traceparent

Spans are sampled ``ParentBased(TraceIdRatioBased(sample_ratio))``: an incoming
sampled flag is followed, new traces are kept at ``sample_ratio``. A span that
is not sampled still has its ids, so the trace id is logged and passed on
either way. The exporter runs on the SDK's own thread, in batches; a
collector that is down costs dropped spans (and a log line), never a request.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict, MultiMapping
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import TracingSettings
from gateway.headers import incoming_trace

_PROPAGATOR = TraceContextTextMapPropagator()
_EXPORT_TIMEOUT_S = 5.0


class Exporting:
    """The process's tracer provider; one ``SpanTrace`` per request."""

    def __init__(self, settings: TracingSettings, version: str) -> None:
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": version}
        )
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=resource,
            shutdown_on_exit=False,  # closed by the process's exit stack, after the drain
        )
        exporter = OTLPSpanExporter(endpoint=str(settings.otlp_endpoint), timeout=_EXPORT_TIMEOUT_S)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("solapi-gateway", version)

    def begin(self, headers: MultiMapping[str]) -> SpanTrace:
        parent, state = incoming_trace(headers)
        context: Context | None = None
        if parent is not None:
            carrier = {"traceparent": parent, **({"tracestate": state} if state else {})}
            context = _PROPAGATOR.extract(carrier)
        span = self.tracer.start_span("gateway", context=context, kind=SpanKind.SERVER)
        return SpanTrace(self, span)

    def close(self) -> None:
        """Send what is still queued (within the exporter's timeout), then stop."""
        self.provider.shutdown()


class SpanTrace:
    __slots__ = ("_exporting", "_span", "_upstream")

    def __init__(self, exporting: Exporting, span: Span) -> None:
        self._exporting = exporting
        self._span = span
        self._upstream: Span | None = None

    @property
    def trace_id(self) -> str:
        return f"{self._span.get_span_context().trace_id:032x}"

    def to_upstream(self, headers: CIMultiDict[str]) -> None:
        parent = set_span_in_context(self._span)
        child = self._exporting.tracer.start_span("upstream", context=parent, kind=SpanKind.CLIENT)
        self._upstream = child
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(child))
        for name, value in carrier.items():
            headers[name] = value

    def upstream_done(self, entry: Any) -> None:
        child = self._upstream
        if child is None:
            return
        child.update_name(f"upstream {entry.route}")
        _set(child, "gateway.attempts", entry.attempts)
        if entry.upstream_status is not None:
            _set(child, "http.response.status_code", entry.upstream_status)
            if entry.upstream_status >= 500:
                child.set_status(Status(StatusCode.ERROR))
        else:  # no answer: the reason says what failed
            _set(child, "error.type", entry.reason or "no answer")
            child.set_status(Status(StatusCode.ERROR, entry.reason))
        child.end()

    def finish(self, entry: Any) -> None:
        span = self._span
        span.update_name(f"gateway {entry.route}")
        forwarded = entry.attempts > 0  # the walk said yes and upstream was tried
        attributes = {
            "http.request.method": entry.method,
            "url.path": entry.path,
            "client.address": entry.peer,
            "http.response.status_code": entry.status,
            "gateway.request_id": entry.request_id,
            "gateway.route": entry.route,
            "gateway.decision": "forward" if forwarded else "refuse",
            "gateway.principal": entry.principal,
            "gateway.role": entry.role,
            "gateway.via": entry.via,
            "gateway.error_code": entry.errorCode,
            "gateway.reason": entry.reason,
            "gateway.batch_items": entry.batch_items,
        }
        for name, value in attributes.items():
            _set(span, name, value)
        if entry.status >= 500:
            span.set_status(Status(StatusCode.ERROR, entry.errorCode))
        span.end()


def _set(span: Span, name: str, value: Any) -> None:
    if value is not None:
        span.set_attribute(name, value)
