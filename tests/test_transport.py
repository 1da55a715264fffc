"""gateway/transport.py: one attempt, and every way of getting no answer mapped to
the contract's error, the kind the metrics count, and whether anything was sent.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.transport import (
    KINDS,
    WHOLE_ANSWER_BYTES,
    AiohttpTransport,
    Answer,
    Failure,
    Outgoing,
    failure,
)

KEY = ConnectionKey("upstream.test", 443, True, True, None, None, None, None)


@pytest.mark.parametrize(
    ("exc", "kind", "error", "sent"),
    [
        (aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "refused")),
         "connect", UpstreamUnavailable, False),
        (aiohttp.ConnectionTimeoutError(), "timeout", UpstreamTimeout, False),
        (aiohttp.SocketTimeoutError(), "timeout", UpstreamTimeout, True),
        (TimeoutError(), "timeout", UpstreamTimeout, True),
        (aiohttp.ServerDisconnectedError(), "reset", UpstreamUnavailable, True),
        (aiohttp.ClientOSError(104, "reset by peer"), "reset", UpstreamUnavailable, True),
        (ConnectionResetError(), "reset", UpstreamUnavailable, True),
        (aiohttp.ClientPayloadError("cut"), "protocol", UpstreamUnavailable, True),
        (aiohttp.ClientResponseError(None, (), status=400, message="bad status line"),  # type: ignore[arg-type]
         "protocol", UpstreamUnavailable, True),
    ],
)  # fmt: skip
def test_each_failure_maps_to_its_error_and_kind(
    exc: BaseException, kind: str, error: type[Exception], sent: bool
) -> None:
    mapped = failure(exc)
    assert (mapped.kind, type(mapped.error), mapped.sent) == (kind, error, sent)
    assert mapped.kind in KINDS
    assert mapped.error.status == {UpstreamUnavailable: 502, UpstreamTimeout: 504}[error]


def test_an_exception_that_is_not_a_network_failure_is_not_disguised_as_one() -> None:
    with pytest.raises(KeyError):
        failure(KeyError("a bug"))


async def test_an_answer_made_whole_is_read_in_pieces() -> None:
    answer = Answer(200, CIMultiDictProxy(CIMultiDict()), body=b"abcdefg")
    assert [await answer.read(3) for _ in range(4)] == [b"abc", b"def", b"g", b""]
    answer.release()  # nothing to give back


# --- the aiohttp transport, on real sockets --------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield AiohttpTransport(session)


@pytest.fixture
async def serve(aiohttp_server) -> Callable[[Handler], Awaitable[str]]:  # type: ignore[no-untyped-def]
    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}"

    return start


def outgoing(base: str, timeout_s: float = 2.0) -> Outgoing:
    headers = CIMultiDict({"Authorization": "HMAC-SHA256 test"})
    return Outgoing("POST", URL(base + "/a?b=1"), headers, b"{}", timeout_s, 1.0)


async def test_one_attempt_sends_exactly_what_it_is_given(
    transport: AiohttpTransport, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    seen: list[tuple[str, str, str, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, request.headers["Authorization"], body))
        return web.Response(status=503, text="busy", headers={"Retry-After": "1"})

    answer = await transport.send(outgoing(await serve(handler)))
    try:
        assert (answer.status, answer.headers["Retry-After"]) == (503, "1")
        assert await answer.read(1024) == b"busy" and await answer.read(1024) == b""
    finally:
        answer.release()
    assert seen == [("POST", "/a?b=1", "HMAC-SHA256 test", b"{}")]


async def test_a_refused_connection_is_a_connect_failure_with_nothing_sent(
    transport: AiohttpTransport,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Failure) as failed:
        await transport.send(outgoing(f"http://127.0.0.1:{port}"))
    assert (failed.value.kind, failed.value.sent) == ("connect", False)


async def test_no_answer_within_the_attempts_time_is_a_timeout(
    transport: AiohttpTransport, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    with pytest.raises(Failure) as failed:
        await transport.send(outgoing(await serve(handler), timeout_s=0.2))
    assert (failed.value.kind, failed.value.sent) == ("timeout", True)
    assert isinstance(failed.value.error, UpstreamTimeout)


async def test_a_whole_answer_cut_short_fails_the_attempt_itself(
    transport: AiohttpTransport, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    # Nothing has reached the caller yet, so the handler can still answer 502.
    with pytest.raises(Failure) as failed:
        await transport.send(outgoing(await serve(handler)))
    assert failed.value.kind in ("reset", "protocol") and failed.value.sent
    assert isinstance(failed.value.error, UpstreamUnavailable)


async def test_an_answer_up_to_the_bound_is_read_whole_a_longer_one_is_streamed(
    transport: AiohttpTransport, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.path.strip("/")))

    base = await serve(handler)
    for size, whole in ((WHOLE_ANSWER_BYTES, True), (WHOLE_ANSWER_BYTES + 1, False)):
        got = Outgoing("GET", URL(f"{base}/{size}"), CIMultiDict(), None, 2.0, 1.0)
        answer = await transport.send(got)
        try:
            assert (answer.body is not None) is whole
            received = b""
            while chunk := await answer.read(65536):
                received += chunk
            assert received == b"x" * size
        finally:
            answer.release()


async def test_an_unframed_answer_is_streamed(
    transport: AiohttpTransport, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: its length is not known in advance
        await response.prepare(request)
        await response.write(b"abc")
        await response.write_eof()
        return response

    answer = await transport.send(outgoing(await serve(handler)))
    try:
        assert answer.body is None
        assert await answer.read(1024) == b"abc" and await answer.read(1024) == b""
    finally:
        answer.release()


async def test_a_streamed_body_cut_short_is_a_failure_while_reading(
    transport: AiohttpTransport, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    size = WHOLE_ANSWER_BYTES + 1000

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    answer = await transport.send(outgoing(await serve(handler)))
    try:
        assert answer.status == 200
        with pytest.raises(Failure) as failed:
            while await answer.read(1024):
                pass
    finally:
        answer.release()
    assert failed.value.kind in ("reset", "protocol")
    assert isinstance(failed.value.error, UpstreamUnavailable)
