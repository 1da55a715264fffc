"""HTTP/1 on the proxy port, answered the gateway's way, below the handler.

aiohttp refuses a request it cannot parse (a header with CR/LF or NUL, an
over-long request line or header, ``Transfer-Encoding`` with
``Content-Length``…) before any handler runs, with a plain-text 400 that
quotes the offending bytes back. Here such a request gets what every other
refusal gets: a JSON body with errorCode ``InvalidRequest``, ``X-Gateway-Error``,
``X-Request-ID``, an access-log line and a metric, and the connection is closed.
The offending bytes are never echoed or logged: they may hold a token.

What the parser lets through (an HTTP/2.0 request line, a ``gzip`` transfer
coding) is judged by the walk's target step (gateway/walk.py), so ``explain``
says the same. Three things remain that only the connection can do:

- A parse error in a body the handler is reading (a bad chunk size) reaches
  that body's reader at once, instead of waiting behind it until the body
  times out (``_RequestHandler.data_received``).
- ``Expect: 100-continue`` gets its ``100 Continue`` when the handler is about to
  read the body (``send_continue``); a request refused before never had its
  body asked for.
- Answers carry no ``Server`` header of the gateway's own, and an answer to a
  request line naming HTTP/2.0 or 0.9 (refused) is an HTTP/1.1 answer, not one
  in the version it named (``GatewayRequest``).

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

from aiohttp import HttpVersion11, hdrs, web, web_protocol
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from gateway.walk import SERVED_VERSIONS

# (request, status aiohttp chose, its exception) → the answer to send
OnBadRequest = Callable[[web.BaseRequest, int, BaseException | None], web.StreamResponse]
# The current send_timeout_s (read when needed, so a reload changes it).
SendTimeoutS = Callable[[], float]

# Unsent output a connection may hold in the gateway before its handler waits for
# the caller (and so stops taking requests from it): one small answer's worth.
OUTPUT_BOUND_BYTES: Final = 64 * 1024

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyUnreadable(Exception):
    """The request's body cannot be read to its end: the HTTP parser refused what
    followed (the parser's exception class is named in ``kind``, never its text)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class GatewayRequest(web.BaseRequest):
    """A request whose answer never names the server, and speaks HTTP/1.0 or 1.1.

    ``asked_version`` is the version its request line named. Anything but 1.0
    and 1.1 is refused (``walk.framing_problem``), and answered as the HTTP/1.1
    server this is: ``version`` says 1.1 for such a request, so aiohttp writes
    that status line (not ``HTTP/2.0 400``) and frames the answer for it.
    """

    ATTRS = web.BaseRequest.ATTRS | frozenset({"asked_version"})

    def __init__(self, message: RawRequestMessage, *args: Any, **kwargs: Any) -> None:
        self.asked_version: tuple[int, int] = tuple(message.version)  # type: ignore[assignment]
        if self.asked_version not in SERVED_VERSIONS:
            message = message._replace(version=HttpVersion11)
        super().__init__(message, *args, **kwargs)

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # Runs after aiohttp set its headers and before the status line is written.
        # ``setdefault`` put aiohttp's own SERVER_SOFTWARE object there: a Server
        # relayed from upstream is another string object, and stays.
        if response.headers.get(hdrs.SERVER) is SERVER_SOFTWARE:
            del response.headers[hdrs.SERVER]


def asked_version(request: web.BaseRequest) -> tuple[int, int]:
    """The HTTP version the request line named (``request.version`` may say 1.1)."""
    if isinstance(request, GatewayRequest):
        return request.asked_version
    return (request.version.major, request.version.minor)


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

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        # A parse error in a body being read is queued as the next message, behind
        # the request it belongs to, and that request's body never ends: its reader
        # would wait for body_timeout_s. Hand the error to the reader instead.
        request = self._current_request
        if request is None or len(self._messages) <= queued:
            return
        message = self._messages[-1][0]
        failed = getattr(message, "exc", None)
        if isinstance(failed, HttpProcessingError) and not request.content.is_eof():
            request.content.set_exception(BodyUnreadable(type(failed).__name__))


def expects_continue(request: web.BaseRequest) -> bool:
    """The caller holds its body back until told ``100 Continue`` (RFC 9110 §10.1.1)."""
    if asked_version(request) != (1, 1) or request.content.is_eof():
        return False
    return any(v.strip().lower() == "100-continue" for v in request.headers.getall(hdrs.EXPECT, ()))


async def send_continue(request: web.BaseRequest) -> None:
    """Ask for the body, if the caller waits to be asked."""
    if expects_continue(request):
        await request.writer.write(_CONTINUE)
        # Not the answer: the answer has not begun (see handle_error above).
        request.writer.output_size = 0


class GatewayServer(web.Server):
    """``web.Server`` whose connections answer parse errors through ``on_bad_request``
    and whose requests are ``GatewayRequest``s."""

    def __init__(
        self,
        handler: Any,
        on_bad_request: OnBadRequest,
        *,
        send_timeout_s: SendTimeoutS | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._on_bad_request = on_bad_request
        self._send_timeout_s = send_timeout_s

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web_protocol.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return GatewayRequest(message, payload, protocol, writer, task, self._loop)

    def __call__(self) -> web_protocol.RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self._kwargs)
        handler.on_bad_request = self._on_bad_request
        handler.send_timeout_s = self._send_timeout_s
        return handler
