"""Trace context: a W3C ``traceparent`` in, ``trace_id`` on the access line, spans out.

    tracing off (no ``tracing:`` key)
        a valid incoming ``traceparent`` (and its ``tracestate``) goes upstream
        unchanged and its trace id is logged; nothing else happens, and the
        OpenTelemetry SDK is never imported
    tracing on
        the request's walk is one span (a child of the incoming traceparent, or
        a new trace whose id is logged), its decision as attributes; the
        upstream exchange is a child span, and upstream receives *that* span's
        traceparent; spans leave in batches over OTLP/HTTP (gateway/otel.py)

The server sees one ``Trace`` per request, through four calls: ``begin`` (in
``Tracing``), ``to_upstream`` (the headers of the exchange), ``upstream_done``
and ``finish``. A request without a traceparent, while tracing is off, gets the
shared ``NO_TRACE``: its cost is one header lookup.

A malformed traceparent (or several) is not forwarded: upstream gets none, as
it would for any header outside the allow-list (gateway/headers.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict, MultiMapping

from gateway.headers import incoming_trace

if TYPE_CHECKING:
    from gateway.config import TracingSettings


class Trace(Protocol):
    """One request's trace context, as the server uses it."""

    @property
    def trace_id(self) -> str | None: ...

    def to_upstream(self, headers: CIMultiDict[str]) -> None:
        """Add the trace headers upstream gets (starting the exchange's span)."""

    def upstream_done(self, entry: Any) -> None:
        """The exchange is over: ``entry`` (the access-log line) says how it went."""

    def finish(self, entry: Any) -> None:
        """The request is answered: ``entry`` holds the walk's decision."""


class Tracing(Protocol):
    """Where each request's ``Trace`` comes from; closed once, after the last request."""

    def begin(self, headers: MultiMapping[str]) -> Trace: ...

    def close(self) -> None: ...


class PassedOn:
    """Tracing off: the caller's trace context, passed upstream as it came."""

    __slots__ = ("state", "traceparent")

    def __init__(self, traceparent: str | None, state: str | None) -> None:
        self.traceparent = traceparent
        self.state = state

    @property
    def trace_id(self) -> str | None:
        return self.traceparent[3:35] if self.traceparent is not None else None

    def to_upstream(self, headers: CIMultiDict[str]) -> None:
        if self.traceparent is not None:
            headers["traceparent"] = self.traceparent
            if self.state is not None:
                headers["tracestate"] = self.state

    def upstream_done(self, entry: Any) -> None:
        pass

    def finish(self, entry: Any) -> None:
        pass


NO_TRACE = PassedOn(None, None)


class Off:
    """No ``tracing:`` configured."""

    def begin(self, headers: MultiMapping[str]) -> Trace:
        if "traceparent" not in headers:  # nearly every request: nothing to do
            return NO_TRACE
        parent, state = incoming_trace(headers)
        return PassedOn(parent, state) if parent is not None else NO_TRACE

    def close(self) -> None:
        pass


OFF = Off()


def start(settings: TracingSettings | None, version: str) -> Tracing:
    """The tracing a process runs with: ``OFF``, or spans exported as ``settings`` say."""
    if settings is None:
        return OFF
    from gateway import otel  # the SDK is imported only when tracing is configured

    return otel.Exporting(settings, version)
