"""HTTP-level refusals, answered the gateway's way.

aiohttp refuses a request it cannot parse (a header with CR/LF or NUL, an
over-long request line or header, ``Transfer-Encoding`` with
``Content-Length``…) before any handler runs, with a plain-text 400 that
quotes the offending bytes back. Here such a request gets what every other
refusal gets: a JSON body with errorCode ``InvalidRequest``, ``X-Gateway-Error``,
``X-Request-ID``, an access-log line and a metric, and the connection is closed.
The offending bytes are never echoed or logged: they may hold a token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol

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


class GatewayServer(web.Server):
    """``web.Server`` whose connections answer parse errors through ``on_bad_request``."""

    def __init__(self, handler: Any, on_bad_request: OnBadRequest, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._on_bad_request = on_bad_request

    def __call__(self) -> web_protocol.RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self._kwargs)
        handler.on_bad_request = self._on_bad_request
        return handler
