"""HTTP-level refusals, answered the gateway's way.

aiohttp refuses a request it cannot parse (a header with CR/LF or NUL, an
over-long request line or header, ``Transfer-Encoding`` with
``Content-Length``…) before any handler runs, with a plain-text 400 that
quotes the offending bytes back. Here such a request gets what every other
refusal gets: a JSON body with errorCode ``InvalidRequest``, ``X-Gateway-Error``,
``X-Request-ID``, an access-log line and a metric, and the connection is closed.
The offending bytes are never echoed or logged: they may hold a token.

Two framings the parser lets through are refused the same way (RFC 9112 §6.1),
because a server in front of the gateway could read them differently: a
``Transfer-Encoding`` on an HTTP/1.0 request, and a transfer coding other than
``chunked`` (``gzip, chunked``…), which the gateway would not decode.

Output is bounded per connection (``BoundedOutput``): answers are written one
at a time, the gateway takes no further request from a connection whose
unsent output passes ``OUTPUT_BOUND_BYTES``, and an answer the caller does not
take within ``send_timeout_s`` ends the connection (``SendTimeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

from aiohttp import hdrs, web, web_protocol
from aiohttp.http_exceptions import TransferEncodingError

# (request, status aiohttp chose, its exception) → the answer to send
OnBadRequest = Callable[[web.BaseRequest, int, BaseException | None], web.StreamResponse]
# The current send_timeout_s (read when needed, so a reload changes it).
SendTimeoutS = Callable[[], float]

# Unsent output a connection may hold in the gateway before its handler waits for
# the caller (and so stops taking requests from it): one small answer's worth.
OUTPUT_BOUND_BYTES: Final = 64 * 1024


# --- output: one answer at a time, bounded, and taken within send_timeout_s ------------------


class SendTimeout(ConnectionResetError):
    """The caller did not take an answer within ``send_timeout_s``; its
    connection was closed. A ``ConnectionError``, like any caller gone away."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the caller did not take the answer within send_timeout_s ({timeout_s:g} s); "
            "connection closed"
        )


class BoundedOutput(web_protocol.RequestHandler):
    """A connection whose unsent answers are bounded, in bytes and in time.

    aiohttp answers pipelined requests one at a time and waits for the caller
    (``drain``) only when the transport holds more than its high-water mark;
    the gateway sets that mark to ``OUTPUT_BOUND_BYTES``, and its handler
    drains after every answer, so a connection never holds more than that
    plus the answer being written, and, while its handler waits, no further
    request of it is taken (aiohttp stops reading once a few are queued).

    The wait itself is bounded: a caller that has not taken the answer within
    ``send_timeout_s`` loses the connection, and the write fails with
    ``SendTimeout``. The timer exists only while a caller is being waited on,
    never for an answer the socket takes at once.
    """

    send_timeout_s: SendTimeoutS | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=OUTPUT_BOUND_BYTES)

    async def _drain_helper(self) -> None:
        # aiohttp's StreamWriter.drain() awaits this whenever the transport has
        # paused writing: the one place every answer waits for its caller.
        timeout = self.send_timeout_s
        if timeout is None or not self._paused or self.transport is None:
            return await super()._drain_helper()
        timeout_s = timeout()
        try:
            async with asyncio.timeout(timeout_s):
                await super()._drain_helper()
        except TimeoutError:
            if self.transport is not None:
                _drop(self.transport)
            raise SendTimeout(timeout_s) from None


def _drop(transport: asyncio.Transport) -> None:
    """Close with a reset: what the caller did not take is dropped at once, in
    the gateway and in the kernel, instead of lingering until it is taken."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # closed meanwhile: abort() is all there is to do
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _RequestHandler(BoundedOutput):
    on_bad_request: OnBadRequest | None = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        on_bad_request = self.on_bad_request
        # Once bytes of an answer are out, only aiohttp's own path (close) is left.
        if on_bad_request is None or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        response = on_bad_request(request, status, exc)
        response.force_close()
        return response


def framing_problem(request: web.BaseRequest) -> TransferEncodingError | None:
    """Why the request's Transfer-Encoding cannot be trusted, or None."""
    codings = request.headers.getall(hdrs.TRANSFER_ENCODING, ())
    if not codings:
        return None
    if request.version < (1, 1):
        return TransferEncodingError("Transfer-Encoding on an HTTP/1.0 request")
    if len(codings) != 1 or codings[0].strip().lower() != "chunked":
        return TransferEncodingError("a transfer coding other than chunked")
    return None


class GatewayServer(web.Server):
    """``web.Server`` whose connections answer parse errors, and the framings
    ``framing_problem`` names, through ``on_bad_request``."""

    def __init__(
        self,
        handler: Any,
        on_bad_request: OnBadRequest,
        *,
        send_timeout_s: SendTimeoutS | None = None,
        **kwargs: Any,
    ) -> None:
        async def screened(request: web.BaseRequest) -> web.StreamResponse:
            if hdrs.TRANSFER_ENCODING in request.headers:
                problem = framing_problem(request)
                if problem is not None:
                    return on_bad_request(request, 400, problem)
            response: web.StreamResponse = await handler(request)
            return response

        super().__init__(screened, **kwargs)
        self._on_bad_request = on_bad_request
        self._send_timeout_s = send_timeout_s

    def __call__(self) -> web_protocol.RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self._kwargs)
        handler.on_bad_request = self._on_bad_request
        handler.send_timeout_s = self._send_timeout_s
        return handler
