"""gateway/protocol.py: what the proxy port's connections do below the handler.

A ``GatewayServer`` with a small handler of the test's own, on a real socket,
spoken to in raw bytes: answers name no server and always say HTTP/1.1; a
broken chunk reaches the body's reader at once; ``100 Continue`` is sent when
the handler asks for the body, and only then. The version and framing refusals
themselves are the walk's (tests/test_walk.py); end to end, with every request
the parser refuses: tests/test_adversarial.py and tests/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway import protocol

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
WAIT_S = 10.0  # far above any answer here; a test that needs it failed anyway


class Served:
    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.port = 0
        self.bad: list[str] = []

    async def raw(self, *parts: bytes, pause_s: float = 0.0) -> bytes:
        """Send ``parts`` (pausing between them), read the answer to EOF."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for n, part in enumerate(parts):
                if n and pause_s:
                    await asyncio.sleep(pause_s)
                writer.write(part)
                await writer.drain()
            return await asyncio.wait_for(reader.read(), WAIT_S)
        finally:
            writer.close()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    state = Served()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        assert state.handler is not None
        return await state.handler(request)

    def bad_request(
        request: web.BaseRequest, status: int, exc: BaseException | None
    ) -> web.StreamResponse:
        state.bad.append(type(exc).__name__)
        return web.Response(status=400, text="bad")

    server = protocol.GatewayServer(handle, bad_request)
    listening = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    state.port = listening.sockets[0].getsockname()[1]
    yield state
    listening.close()
    await server.shutdown(1)
    await listening.wait_closed()


def head_of(answer: bytes) -> list[str]:
    return answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")


GET = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


async def test_an_answer_names_no_server(served: Served) -> None:
    async def ok(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok")

    served.handler = ok
    head = head_of(await served.raw(GET))
    assert head[0] == "HTTP/1.1 200 OK"
    assert not [line for line in head if line.lower().startswith("server:")], head


async def test_a_server_header_the_handler_relays_stays(served: Served) -> None:
    async def relayed(request: web.BaseRequest) -> web.StreamResponse:
        # As upstream's answer is relayed: a Server of upstream's own.
        return web.Response(text="ok", headers={"Server": "upstream/1.0"})

    served.handler = relayed
    assert "Server: upstream/1.0" in head_of(await served.raw(GET))


@pytest.mark.parametrize("line", [b"GET / HTTP/2.0", b"GET / HTTP/0.9", b"GET /"])
async def test_an_answer_to_another_version_is_an_http_1_1_answer(
    served: Served, line: bytes
) -> None:
    seen: list[tuple[int, int]] = []

    async def refuse(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(protocol.asked_version(request))
        response = web.Response(status=400, text="no")
        response.force_close()
        return response

    served.handler = refuse
    head = head_of(await served.raw(line + b"\r\nHost: t\r\n\r\n"))
    assert head[0] == "HTTP/1.1 400 Bad Request"
    assert "Connection: close" in head
    assert seen and seen[0] not in ((1, 0), (1, 1))  # the handler saw what was asked


async def test_a_bad_chunk_after_a_pause_reaches_the_body_reader_at_once(
    served: Served,
) -> None:
    failures: list[BaseException] = []

    async def read(request: web.BaseRequest) -> web.StreamResponse:
        try:
            await asyncio.wait_for(request.read(), WAIT_S)
        except Exception as exc:  # the test looks at what it was
            failures.append(exc)
        response = web.Response(status=400, text="framing")
        response.force_close()  # as the gateway's InvalidRequest does: the parser is done
        return response

    served.handler = read
    started = time.monotonic()
    answer = await served.raw(
        b'POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"r\r\n',
        b"zz\r\n",
        pause_s=0.3,  # the handler is reading by then
    )
    assert head_of(answer)[0] == "HTTP/1.1 400 Bad Request"
    assert len(failures) == 1 and isinstance(failures[0], protocol.BodyUnreadable), failures
    assert time.monotonic() - started < WAIT_S / 2  # not the reader's own timeout


async def test_continue_is_sent_when_the_handler_asks_for_the_body(served: Served) -> None:
    async def echo(request: web.BaseRequest) -> web.StreamResponse:
        await protocol.send_continue(request)
        return web.Response(body=await request.read())

    served.handler = echo
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        # Nothing of the body was sent: the answer so far can only be the 100.
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hi")
        answer = await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()
    assert head_of(answer)[0] == "HTTP/1.1 200 OK"
    assert answer.endswith(b"\r\n\r\nhi")


async def test_no_continue_without_the_expectation_or_a_body_to_ask_for(served: Served) -> None:
    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        expected = protocol.expects_continue(request)
        await protocol.send_continue(request)
        return web.Response(text=str(expected))

    served.handler = answer
    plain = await served.raw(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    )
    empty = await served.raw(
        b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    old = await served.raw(
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    )
    for got in (plain, empty, old):
        assert b"100 Continue" not in got
        assert got.endswith(b"False")
