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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web, web_protocol
from aiohttp.http_exceptions import TransferEncodingError

# (request, status aiohttp chose, its exception) → the answer to send
OnBadRequest = Callable[[web.BaseRequest, int, BaseException | None], web.StreamResponse]


class _RequestHandler(web_protocol.RequestHandler):
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

    def __init__(self, handler: Any, on_bad_request: OnBadRequest, **kwargs: Any) -> None:
        async def screened(request: web.BaseRequest) -> web.StreamResponse:
            if hdrs.TRANSFER_ENCODING in request.headers:
                problem = framing_problem(request)
                if problem is not None:
                    return on_bad_request(request, 400, problem)
            response: web.StreamResponse = await handler(request)
            return response

        super().__init__(screened, **kwargs)
        self._on_bad_request = on_bad_request

    def __call__(self) -> web_protocol.RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self._kwargs)
        handler.on_bad_request = self._on_bad_request
        return handler
