"""The proxy handler: it strings the request's walk together, nothing more.

    target → identity → route → role → body → sign → forward → respond

The deciding steps (up to the body) are ``gateway/walk.py``, shared with
``solapi-gateway explain``; each raises a ``GatewayError`` to say no. This
module does the I/O around them: it reads the body once ``walk.admit`` has
said yes, forwards, turns a refusal into the JSON error, and for every
request, answered or refused, writes one access-log line and the metrics.

A request works on one snapshot of the loaded config (``Loaded``), taken when
it starts, so a reload in the middle of it cannot mix old and new policy.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import InvalidURLError

from gateway import logs, protocol, tracing, walk
from gateway.config import Settings
from gateway.errors import (
    ClientClosedRequest,
    GatewayError,
    InternalError,
    InvalidPath,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
)
from gateway.headers import downstream_headers, new_request_id, request_id, upstream_headers
from gateway.identity import peer_cert, verifier_for
from gateway.metrics import Metrics
from gateway.policy import UNMATCHED
from gateway.protocol import SendTimeout
from gateway.relay import Slot, relay, send, unsent
from gateway.retry import Tally
from gateway.routes import Route
from gateway.signing import Verifier
from gateway.state import State
from gateway.tls import ServerTls
from gateway.transport import UpstreamRequest
from gateway.upstream import Upstream

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
# Why an upstream exchange gave no answer, by the kind of its last failed attempt.
_NO_ANSWER = {
    "connect": "upstream could not be reached",
    "reset": "upstream closed the connection",
    "protocol": "upstream sent an answer that could not be read",
    "timeout": "upstream did not answer in time",
}


@dataclass(frozen=True, slots=True)
class Loaded:
    settings: Settings
    verifier: Verifier


@dataclass(slots=True)
class Entry:
    """One access-log line, filled in as the request walks."""

    request_id: str
    method: str
    path: str
    peer: str | None
    route: str = UNMATCHED
    principal: str | None = None
    role: str | None = None
    via: str | None = None
    status: int = 0
    errorCode: str | None = None  # the contract's spelling, as logged
    reason: str | None = None
    batch_items: int | None = None
    duration_ms: float = 0.0
    upstream_ms: float | None = None
    upstream_status: int | None = None
    attempts: int = 0
    trace_id: str | None = None
    # Not on the access-log line: the batch's items (for the audit log only), and
    # the request's trace context (gateway/tracing.py).
    record_ids: list[str] | None = None
    trace: tracing.Trace = tracing.NO_TRACE

    def line(self) -> dict[str, Any]:
        """The access-log line: time, event, then every field that is set, in this order."""
        line: dict[str, Any] = {
            "time": logs.now_iso(),
            "event": "access",
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
        }
        if self.peer is not None:
            line["peer"] = self.peer
        line["route"] = self.route
        for name in ("principal", "role", "via"):
            if (value := getattr(self, name)) is not None:
                line[name] = value
        line["status"] = self.status
        for name in ("errorCode", "reason", "batch_items"):
            if (value := getattr(self, name)) is not None:
                line[name] = value
        line["duration_ms"] = self.duration_ms
        for name in ("upstream_ms", "upstream_status"):
            if (value := getattr(self, name)) is not None:
                line[name] = value
        line["attempts"] = self.attempts
        if self.trace_id is not None:
            line["trace_id"] = self.trace_id
        return line


class Gateway:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        state: State | None = None,
        tracer: tracing.Tracing = tracing.OFF,
    ) -> None:
        # The process's shared state (gateway/state.py); a lone in-memory one by default.
        self.state = state if state is not None else State.in_memory()
        self.tracing = tracer
        self.loaded = Loaded(settings, verifier_for(settings.policy))
        self.metrics = metrics
        self.upstream = Upstream()
        self.draining = False
        self.audit: logs.AuditLog | None = None  # opened by the service when configured
        self.tls: ServerTls | None = None  # the proxy port's TLS, set up by the service

    def swap(self, settings: Settings) -> None:
        """Use a newly loaded config from the next request on."""
        self.loaded = Loaded(settings, verifier_for(settings.policy))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        loaded = self.loaded
        peer = request.remote
        # The path only, as for every request: a query string may carry anything.
        path = request.raw_path.partition("?")[0][:512]
        entry = Entry(request_id(request.headers), request.method, path, peer)
        entry.trace = trace = self.tracing.begin(request.headers)
        entry.trace_id = trace.trace_id
        metrics = self.metrics
        metrics.entered()
        try:
            try:
                response = await self._walk(request, loaded, entry)
            except GatewayError as exc:
                response = self._refuse(exc, entry)
                if protocol.expects_continue(request):
                    # Refused before the body was asked for: the caller holds it back,
                    # so answer and close rather than wait for (or read) a body.
                    response.force_close()
            except Exception:
                # A fault of the gateway's own, not a refusal: logged with its traceback,
                # answered like every other error (or, once an answer has begun, cut).
                logging.getLogger("gateway").exception("request %s failed", entry.request_id)
                if request.writer.output_size > 0 and request.transport is not None:
                    request.transport.abort()
                response = self._refuse(InternalError("The gateway failed on this request."), entry)
            if entry.errorCode is not None:
                # The gateway's own answer is logged before it is sent, as it always was
                # (a caller that reads the log after its answer finds the line there).
                entry.status = response.status
                self._finish(entry, time.perf_counter() - started)
                logs.flush()
                failed = await send(request, response)
                if isinstance(failed, SendTimeout):  # the line is out: say it separately
                    logs.emit("connection_closed", request_id=entry.request_id, reason=str(failed))
                return response
            if not response.prepared:  # (a streamed answer went out as it arrived)
                failed = await send(request, response)
                if failed is not None:
                    entry.reason = unsent(failed)
        finally:
            metrics.left()
        entry.status = response.status
        self._finish(entry, time.perf_counter() - started)
        return response

    def bad_request(
        self, request: web.BaseRequest, status: int, exc: BaseException | None
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not parse: see gateway/protocol.py."""
        entry = Entry(new_request_id(), request.method, "", request.remote)
        # The exception's class only: its text quotes the bytes, which may hold a token.
        why = type(exc).__name__ if exc is not None else None
        error: GatewayError
        if isinstance(exc, InvalidURLError):
            error = InvalidPath("The request target could not be parsed.", reason=why)
        elif status < 500:
            error = InvalidRequest("The request is not well-formed HTTP/1.1.", reason=why)
        else:
            error = InternalError("The gateway failed on this request.", reason=why)
        response = self._refuse(error, entry)
        entry.status = response.status
        self._finish(entry, 0.0)
        logs.flush()  # before aiohttp sends the answer, as for every refusal
        return response

    async def _walk(
        self, request: web.BaseRequest, loaded: Loaded, entry: Entry
    ) -> web.StreamResponse:
        settings = loaded.settings
        policy, limit = settings.policy, settings.max_body_bytes
        decision = walk.Decision(
            request.method, request.raw_path, protocol.asked_version(request), explain=False
        )
        now = time.time()
        try:
            walk.locate(decision, request.headers, policy)
            # After the route lookup, so that even ShuttingDown is counted by route.
            if self.draining:
                raise ShuttingDown("The gateway is shutting down; retry on another instance.")
            # Only a certificate the handshake verified: getpeercert() is empty otherwise.
            transport = request.transport
            cert = peer_cert(transport.get_extra_info("peercert")) if transport else None
            walk.identify(decision, request.headers, entry.peer, policy, loaded.verifier, now, cert)
            # The shared state (gateway/state.py) answers what the pure walk cannot:
            # an HMAC caller's salt before the route step, the rate limits last.
            caller = decision.caller
            if caller is not None and caller.signed is not None:  # (no coroutine otherwise)
                await self.state.remember(decision, settings, self.metrics)
            walk.authorize(decision, policy)
            body = await read_body(request, limit, settings.body_timeout_s)
            walk.check_body(decision, request.headers, body, policy, limit)
            if decision.charges:
                await self.state.consume(decision, settings, self.metrics)
        finally:
            self._note(entry, decision)
        route = decision.route
        assert route is not None  # the walk passed every step
        # The parsed batch (a list of up to 1000 strings) need not live on while
        # upstream answers: 64 such requests in flight are megabytes of RSS.
        del decision
        return await self._forward(request, settings, route, body, entry)

    def _note(self, entry: Entry, decision: walk.Decision) -> None:
        """Copy what the walk found into the access-log line (and the batch metric)."""
        entry.path = decision.path if decision.path is not None else entry.path
        entry.route = decision.route_name
        caller = decision.caller
        if caller is not None:
            entry.principal, entry.role, entry.via = caller.principal, caller.role, caller.via
        if decision.items is not None:  # a batch that passed validation, whatever follows
            if self.audit is not None:  # (kept only for the audit line)
                entry.record_ids = decision.items
            entry.batch_items = len(decision.items)
            self.metrics.batch(entry.route, entry.batch_items)

    async def _forward(
        self,
        request: web.BaseRequest,
        settings: Settings,
        route: Route,
        body: bytes,
        entry: Entry,
    ) -> web.StreamResponse:
        upstream_request = UpstreamRequest(
            request.method,
            request.raw_path,
            upstream_headers(request.headers, settings.forward_headers, entry.request_id),
            None if not body and request.method in _NO_BODY_METHODS else body,
            on_throttle=route.retry_on_throttle,
        )
        entry.trace.to_upstream(upstream_request.headers)
        tally = Tally()
        slots = await self.upstream.acquire_slot(settings.upstream)
        started = time.perf_counter()
        try:
            answer = await self.upstream.exchange(
                upstream_request, settings.upstream, settings.signer.fresh_header, tally
            )
        except GatewayError as exc:
            slots.release()
            if exc.reason is None and tally.error_kind is not None:
                exc.reason = f"{_NO_ANSWER[tally.error_kind]} ({tally.attempts} attempt(s))"
            entry.reason = exc.reason
            self._upstream_done(entry, tally, started)
            raise
        entry.upstream_status = answer.status
        if answer.body is not None:
            # Read whole: upstream is done with, and its slot free, before the caller
            # is sent a byte (handle() sends it, however slowly the caller reads).
            slots.release()
            self._upstream_done(entry, tally, started)
            response = web.Response(status=answer.status, reason=answer.reason, body=answer.body)
            downstream_headers(answer.headers, entry.request_id, into=response.headers)
            return response
        headers = downstream_headers(answer.headers, entry.request_id)
        slot = Slot(slots)
        try:
            streamed, entry.reason = await relay(request, answer, headers, tally, slot)
            return streamed
        finally:
            answer.release()
            slot.release()
            self._upstream_done(entry, tally, started)

    def _upstream_done(self, entry: Entry, tally: Tally, started: float) -> None:
        seconds = time.perf_counter() - started
        entry.upstream_ms = round(seconds * 1000, 3)
        entry.attempts = tally.attempts
        self.metrics.upstream(entry.route, seconds, tally.failures, tally.retries)
        entry.trace.upstream_done(entry)

    def _refuse(self, exc: GatewayError, entry: Entry) -> web.Response:
        entry.errorCode = exc.code
        entry.reason = exc.reason
        if not isinstance(exc, ClientClosedRequest):  # nobody is there to answer
            self.metrics.rejected(entry.route, exc.code)
        if isinstance(exc, RateLimited):
            self.metrics.rate_limited(exc.limit, entry.route)
        return error_response(exc, entry.request_id, close=self.draining)

    def _finish(self, entry: Entry, seconds: float) -> None:
        """The metrics and the access line (written by the end of this loop turn)."""
        entry.duration_ms = round(seconds * 1000, 3)
        self.metrics.request(
            entry.route, entry.method, entry.status, seconds, entry.principal, entry.via
        )
        line = entry.line()
        logs.access(line)
        entry.trace.finish(entry)
        if self.audit is not None and entry.record_ids is not None:
            self.audit.write_batch(line, entry.record_ids)


def settle_after_start() -> None:
    """Take what start-up built (modules, config, policy, sessions: tens of thousands
    of objects that live as long as the process) out of the cyclic garbage
    collector's view. Otherwise every full collection walks all of them again,
    a pause of tens of milliseconds in the middle of some request."""
    gc.collect()
    gc.freeze()


def error_response(exc: GatewayError, rid: str, *, close: bool = False) -> web.Response:
    response = web.Response(
        status=exc.status,
        body=orjson.dumps(exc.body()),
        content_type="application/json",
        headers={"X-Gateway-Error": exc.code, "X-Request-ID": rid, **exc.headers},
    )
    # After a refused or half-read body the connection's state is not worth
    # trusting; and while draining, the caller should reconnect elsewhere.
    if close or isinstance(exc, PayloadTooLarge | RequestTimeout | ShuttingDown | InvalidRequest):
        response.force_close()
    return response


async def read_body(request: web.BaseRequest, limit: int, timeout_s: float) -> bytes:
    """The whole body: PayloadTooLarge as soon as it passes ``limit`` bytes (before
    asking for it, when its Content-Length says so), RequestTimeout if it has not
    all arrived within ``timeout_s`` (a trickling caller may hold a connection, but
    not for ever), InvalidRequest if its framing breaks off, ClientClosedRequest if
    the caller hangs up first."""
    if request.content_length is not None and request.content_length > limit:
        raise walk.too_large(limit)
    content = request.content
    chunks: list[bytes] = []
    size = 0
    try:
        if content.is_eof():
            # All of it came with the headers (every body-less request, most small
            # ones): take it as it is, without a timer (nor a 100 Continue to send).
            body = content.read_nowait(-1)
            if content.at_eof():
                if len(body) > limit:
                    raise walk.too_large(limit)
                return body
            chunks, size = [body], len(body)
        async with asyncio.timeout(timeout_s):
            await protocol.send_continue(request)
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise walk.too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"The body did not arrive within {timeout_s:g} s.") from None
    except protocol.BodyUnreadable as exc:
        raise InvalidRequest(
            "The request body is not well-formed HTTP/1.1.",
            reason=f"the body's framing broke off ({exc.kind})",
        ) from None
    except OSError:  # aiohttp hands the reader a ConnectionResetError once the caller is gone
        raise ClientClosedRequest(
            "The caller closed the connection before its body arrived.",
            reason=f"caller went away after {size} body bytes",
        ) from None
    return b"".join(chunks)
