"""Trace context through the gateway, and spans exported over OTLP/HTTP.

With tracing off, a valid ``traceparent`` reaches upstream unchanged and its
trace id is on the access line; a malformed one goes nowhere; the SDK is never
imported. With ``tracing:`` on, a local OTLP/HTTP receiver (an aiohttp app
here, decoding the protobuf ``ExportTraceServiceRequest``) gets the request's
span and the upstream exchange's child span, and upstream gets the child's
traceparent.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from support import Creds, GatewayProc, SandboxProc, poll

from gateway.headers import incoming_trace
from gateway.tracing import NO_TRACE, OFF

RESTORE = "/crm-core/v1/records/bulk/restore"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


# --- which traceparent counts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([TRACEPARENT], TRACEPARENT),
        ([f" {TRACEPARENT} "], TRACEPARENT),
        ([f"01-{TRACE}-{PARENT}-01-later-fields"], f"01-{TRACE}-{PARENT}-01-later-fields"),
        ([f"ff-{TRACE}-{PARENT}-01"], None),  # version ff is invalid
        ([f"00-{TRACE}-{PARENT}-01-extra"], None),  # version 00 has four fields
        ([f"00-{TRACE.upper()}-{PARENT}-01"], None),
        ([f"00-{'0' * 32}-{PARENT}-01"], None),
        ([f"00-{TRACE}-{'0' * 16}-01"], None),
        ([f"00-{TRACE[:-1]}-{PARENT}-01"], None),
        ([TRACEPARENT, TRACEPARENT], None),  # two: which one would upstream believe?
        ([], None),
    ],
)
def test_only_one_well_formed_traceparent_counts(values: list[str], expected: str | None) -> None:
    headers = CIMultiDict(("traceparent", v) for v in values)
    headers.add("tracestate", "vendor=1")
    assert incoming_trace(headers) == (expected, "vendor=1" if expected else None)


def test_a_tracestate_goes_along_only_alone_and_short() -> None:
    one = CIMultiDict({"traceparent": TRACEPARENT, "tracestate": "a=1"})
    assert incoming_trace(one)[1] == "a=1"
    two = CIMultiDict([("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")])
    assert incoming_trace(two)[1] is None
    long = CIMultiDict({"traceparent": TRACEPARENT, "tracestate": "a=" + "x" * 600})
    assert incoming_trace(long)[1] is None


def test_tracing_off_passes_the_traceparent_on_unchanged() -> None:
    assert OFF.begin(CIMultiDict()) is NO_TRACE
    trace = OFF.begin(CIMultiDict({"traceparent": TRACEPARENT, "tracestate": "a=1"}))
    assert trace.trace_id == TRACE
    headers: CIMultiDict[str] = CIMultiDict()
    trace.to_upstream(headers)
    assert dict(headers) == {"traceparent": TRACEPARENT, "tracestate": "a=1"}
    bad = OFF.begin(CIMultiDict({"traceparent": "garbage"}))
    assert bad is NO_TRACE
    NO_TRACE.to_upstream(headers := CIMultiDict())
    assert not headers


def test_a_gateway_without_tracing_never_imports_the_sdk() -> None:
    code = (
        "import sys\n"
        "from gateway import cli, service, server, supervisor, tracing\n"
        "tracing.start(None, '0')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- end to end, tracing off ----------------------------------------------------------------


def received(sandbox: SandboxProc, request_id: str) -> dict[str, Any]:
    (found,) = [r for r in sandbox.requests() if r["headers"].get("x-request-id") == request_id]
    return found


def access_line(gateway: GatewayProc, request_id: str) -> dict[str, Any]:
    (line,) = [e for e in gateway.access_lines() if e["request_id"] == request_id]
    return line


def member(creds: Creds, request_id: str, **extra: str) -> dict[str, str]:
    return {
        "Authorization": creds.bearer("MEMBER"),
        "Content-Type": "application/json",
        "X-Request-ID": request_id,
        **extra,
    }


def body() -> bytes:
    digits = "".join(secrets.choice("0123456789") for _ in range(16))
    return b'{"recordIds":["CRMRC' + digits.encode() + b'TRACE000001"]}'


@pytest.mark.e2e
async def test_without_tracing_upstream_gets_the_callers_traceparent_and_the_log_its_trace_id(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    headers = member(creds, "trace-off-1", traceparent=TRACEPARENT, tracestate="v=1")
    reply = await gateway.send(http_session, "POST", RESTORE, headers=headers, data=body())
    assert reply.status == 200
    sent = received(sandbox, "trace-off-1")["headers"]
    assert (sent["traceparent"], sent["tracestate"]) == (TRACEPARENT, "v=1")

    bad = member(creds, "trace-off-2", traceparent="00-not-a-trace-01", tracestate="v=1")
    reply = await gateway.send(http_session, "POST", RESTORE, headers=bad, data=body())
    assert reply.status == 200
    sent = received(sandbox, "trace-off-2")["headers"]
    assert "traceparent" not in sent and "tracestate" not in sent

    await poll(lambda: len(gateway.access_lines()) > 0 and _has(gateway, "trace-off-2"))
    assert access_line(gateway, "trace-off-1")["trace_id"] == TRACE
    assert "trace_id" not in access_line(gateway, "trace-off-2")


def _has(gateway: GatewayProc, request_id: str) -> bool:
    return any(e["request_id"] == request_id for e in gateway.access_lines())


# --- end to end, spans to a local OTLP/HTTP receiver ---------------------------------------


@dataclass
class Receiver:
    url: str
    spans: list[tuple[dict[str, Any], Span]] = field(default_factory=list)  # (resource, span)

    def named(self, prefix: str) -> list[Span]:
        return [span for _, span in self.spans if span.name.startswith(prefix)]


@pytest.fixture
async def otlp(aiohttp_server: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver("")

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                receiver.spans += [(resource, span) for span in scope.spans]
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = await aiohttp_server(app)
    receiver.url = f"http://127.0.0.1:{server.port}"
    yield receiver


def attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        out[attribute.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.mark.e2e
async def test_spans_reach_the_collector_and_upstream_gets_the_child_spans_traceparent(
    start_gateway: Callable[..., GatewayProc],
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    otlp: Receiver,
) -> None:
    tracing = {"otlp_endpoint": otlp.url, "service_name": "sgw-test", "sample_ratio": 1.0}
    traced = start_gateway(settings={"tracing": tracing})

    async def status(headers: dict[str, str]) -> int:
        reply = await traced.send(http_session, "POST", RESTORE, headers=headers, data=body())
        return reply.status

    assert await status(member(creds, "trace-on-1", traceparent=TRACEPARENT)) == 200
    assert await status(member(creds, "trace-on-2")) == 200  # no traceparent: a new trace
    viewer = member(creds, "trace-on-3", traceparent=TRACEPARENT)
    viewer["Authorization"] = creds.bearer("VIEWER")
    assert await status(viewer) == 403
    # The exporter sends in batches; a drain sends what is left before the process exits.
    assert await asyncio.to_thread(traced.proc.stop) == 0

    requests = otlp.named("gateway ")
    exchanges = otlp.named("upstream ")
    assert {resource["service.name"] for resource, _ in otlp.spans} == {"sgw-test"}
    by_id = {attributes(s)["gateway.request_id"]: s for s in requests}
    assert set(by_id) == {"trace-on-1", "trace-on-2", "trace-on-3"}
    assert len(exchanges) == 2  # the refused request never went upstream

    # The walk: one SERVER span, a child of the caller's traceparent, the decision on it.
    walked = by_id["trace-on-1"]
    assert walked.name == "gateway records-bulk-restore"
    assert walked.kind == Span.SPAN_KIND_SERVER
    assert (walked.trace_id.hex(), walked.parent_span_id.hex()) == (TRACE, PARENT)
    said = attributes(walked)
    assert said["gateway.decision"] == "forward"
    assert said["gateway.route"] == "records-bulk-restore"
    assert said["gateway.principal"] == "test-member"
    assert said["http.response.status_code"] == 200
    # The exchange: its CLIENT child, whose traceparent upstream received.
    (exchange,) = [s for s in exchanges if s.parent_span_id == walked.span_id]
    assert exchange.kind == Span.SPAN_KIND_CLIENT
    assert exchange.trace_id == walked.trace_id
    assert attributes(exchange)["http.response.status_code"] == 200
    sent = received(sandbox, "trace-on-1")["headers"]["traceparent"]
    assert sent == f"00-{TRACE}-{exchange.span_id.hex()}-01"

    # A new trace: its id is the one on the access line and the one upstream saw.
    new = by_id["trace-on-2"]
    assert not new.parent_span_id
    assert access_line(traced, "trace-on-2")["trace_id"] == new.trace_id.hex()
    assert received(sandbox, "trace-on-2")["headers"]["traceparent"].split("-")[1] == (
        new.trace_id.hex()
    )

    refused = attributes(by_id["trace-on-3"])
    assert refused["gateway.decision"] == "refuse"
    assert refused["gateway.error_code"] == "Forbidden"
    assert refused["http.response.status_code"] == 403
