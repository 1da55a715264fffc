"""A stand-in for SOLAPI in the test's own event loop: a bare HTTP/1.1 server on a real
socket whose every answer (or silence, or reset) the test decides.

Each request it reads takes the next behaviour of ``script``; once that is used up,
``otherwise`` (by default: 200 ``{"ok":true}``, the connection kept)::

    upstream = FakeUpstream(hang)     # the first request is never answered
    await upstream.start()
    gateway = start_gateway(upstream.url)
    ...
    upstream.received[0].headers["authorization"]

A behaviour is ``async (received, writer) -> bool``: it writes what it likes (or
nothing) and says whether the connection stays open for another request.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

OK_BODY = b'{"ok":true}'


@dataclass(frozen=True)
class Received:
    """One request as the fake read it; header names in lower case."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))


Behaviour = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


def answer(status: int, body: bytes = OK_BODY, extra: str = "", *, close: bool = False) -> bytes:
    """A whole JSON response; ``extra`` is more header lines, each ending in CRLF."""
    connection = "Connection: close\r\n" if close else ""
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{connection}{extra}\r\n"
    ).encode() + body


def replying(
    status: int, body: bytes = OK_BODY, extra: str = "", *, close: bool = False
) -> Behaviour:
    """Answer with ``status``; then keep the connection, or close it if ``close``."""

    async def reply(received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(status, body, extra, close=close))
        await writer.drain()
        return not close

    return reply


ok = replying(200)


def chunked_head(status: int) -> bytes:
    """The head of an answer whose length is not known in advance (chunked)."""
    return f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def reset(received: Received, writer: asyncio.StreamWriter) -> bool:
    """Close with an RST, not a FIN: what a crashed or killed peer looks like."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return False


async def hang(received: Received, writer: asyncio.StreamWriter) -> bool:
    """Never answer: wait until the fake stops."""
    await asyncio.Event().wait()
    return False


class FakeUpstream:
    def __init__(self, *script: Behaviour, otherwise: Behaviour = ok) -> None:
        self.script = list(script)
        self.otherwise = otherwise
        self.received: list[Received] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def authorizations(self) -> list[str]:
        """The Authorization header of every request received, in order."""
        return [r.headers.get("authorization", "") for r in self.received]

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and drop the open ones, ending any behaviour still
        waiting. Stopping twice is stopping once."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(method, target, headers, body)
                self.received.append(received)
                behaviour = self.script.pop(0) if self.script else self.otherwise
                if not await behaviour(received, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            self._connections.discard(task)
