"""No caller can starve the others by not reading its answers.

The attack (THREAT_MODEL.md, "A caller that does not read"): as many connections
as ``upstream.max_concurrent``, each pipelining a few hundred requests for large
answers and never reading one. Before the fix, answers over 64 KiB kept every
upstream slot taken (everyone else got 503 ``Overloaded``), and answers under it
were buffered in the gateway without bound.

Here, end to end: another caller is served while the attack runs, the gateway's
RSS grows by less than 64 MiB, and each attacking connection is closed once
``send_timeout_s`` passes (logged with a reason, not as a 5xx). In-process, the
two rules gateway/protocol.py keeps: an answer not taken in time ends the
connection, and a connection waiting on its caller is not read from.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import Creds, GatewayProc, SandboxProc, poll

from gateway.protocol import OUTPUT_BOUND_BYTES, GatewayServer, SendTimeout

TRASH = "/crm-core/v1/records/trash"
MAX_CONCURRENT = 4  # upstream slots, and so attacking connections
PIPELINED = 400  # requests each attacking connection sends without reading
SEND_TIMEOUT_S = 3.0
RSS_GROWTH_LIMIT = 64 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def fair_gateway(
    start_gateway: Callable[..., GatewayProc],
) -> Callable[[str], GatewayProc]:
    """A gateway with ``MAX_CONCURRENT`` upstream slots and ``SEND_TIMEOUT_S``."""

    def start(upstream_url: str) -> GatewayProc:
        return start_gateway(
            upstream_url,
            settings={"send_timeout_s": SEND_TIMEOUT_S},
            upstream={"max_concurrent": MAX_CONCURRENT},
        )

    return start


def in_flight(gateway: GatewayProc) -> float:
    status, body = gateway.admin("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("gateway_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("no gateway_in_flight_requests")


class Attack:
    """Connections that pipeline requests and never read an answer."""

    def __init__(self, port: int, request: bytes, connections: int, pipelined: int) -> None:
        self.port, self.request = port, request
        self.connections, self.pipelined = connections, pipelined
        self.sockets: list[socket.socket] = []

    def start(self) -> None:
        for _ in range(self.connections):
            sock = socket.socket()
            # A small receive window, as a caller that never reads would leave it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(self.request * self.pipelined)
            self.sockets.append(sock)

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()


class RssWatch:
    """The most a process's RSS grew over a baseline, sampled in the background."""

    def __init__(self, pid: int) -> None:
        self.pid, self.baseline, self.peak = pid, rss_bytes(pid), 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssWatch:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *_: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def settled(count: Callable[[], int], quiet_s: float = 0.5, timeout_s: float = 30) -> None:
    """Until ``count()`` (requests upstream has seen) stops growing for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    before = count()
    while True:
        await asyncio.sleep(quiet_s)
        now = count()
        if now == before:
            return
        assert time.monotonic() < deadline, "the attack never stopped making progress"
        before = now


async def served_within(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], bound_s: float
) -> None:
    started = time.monotonic()
    async with session.get(url, headers=headers) as response:
        await response.read()
        took = time.monotonic() - started
        assert response.status == 200, (response.status, response.headers.get("X-Gateway-Error"))
    assert took < bound_s, f"another caller waited {took:.2f} s"


@pytest.mark.e2e
@pytest.mark.parametrize("limit", [1000, 480], ids=["answers-over-64KiB", "answers-under-64KiB"])
async def test_callers_that_never_read_block_nobody_and_cost_bounded_memory(
    start_sandbox: Callable[..., SandboxProc],
    fair_gateway: Callable[[str], GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
    limit: int,
) -> None:
    sandbox = start_sandbox()  # its own, so the trash holds all its records
    gateway = fair_gateway(sandbox.url)
    viewer = {"Authorization": creds.bearer("VIEWER")}
    target = f"{TRASH}?limit={limit}"
    for _ in range(3):  # warm: the first answers' allocations are not the attack's
        reply = await gateway.send(http_session, "GET", target, headers=viewer)
        assert reply.status == 200
    size = len(reply.body)
    assert (size > 65536) == (limit == 1000), size

    request = (
        f"GET {target} HTTP/1.1\r\nHost: gateway\r\nAuthorization: {viewer['Authorization']}"
        "\r\n\r\n"
    ).encode()
    attack = Attack(gateway.port, request, MAX_CONCURRENT, PIPELINED)

    def cut() -> list[dict[str, Any]]:
        return [a for a in gateway.access_lines() if "send_timeout_s" in a.get("reason", "")]

    try:
        with RssWatch(gateway.proc.pid) as rss:
            attack.start()
            await settled(sandbox.count)  # the attack took what it could
            assert rss.growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss.growth >> 20} MiB"
            # Every attacking connection has an answer its caller is not taking...
            assert in_flight(gateway) >= MAX_CONCURRENT
            # ...and yet others are served, well before those connections are cut.
            for _ in range(5):
                await served_within(http_session, gateway.url + TRASH, viewer, SEND_TIMEOUT_S / 2)
            # Then each attacking connection is closed: one line each, with a reason.
            await poll(lambda: len(cut()) >= MAX_CONCURRENT, timeout_s=SEND_TIMEOUT_S + 15)
        assert rss.growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss.growth >> 20} MiB"
    finally:
        attack.stop()
    lines = cut()
    assert len(lines) == MAX_CONCURRENT
    assert {line["status"] for line in lines} == {200}  # upstream's answer; not a 5xx
    # Each connection got at most the answers its buffers could hold, not all it asked for.
    attacked = [a for a in gateway.access_lines() if a["path"] == TRASH and a["status"] == 200]
    assert len(attacked) < MAX_CONCURRENT * PIPELINED
    assert all(a["status"] < 500 for a in gateway.access_lines())
    assert (await gateway.send(http_session, "GET", target, headers=viewer)).status == 200


# --- a streamed answer: the slot goes back before the gateway waits on its caller ----------

STREAMED_BYTES = 2 << 20  # chunked, so streamed whatever its size


class StreamingUpstream:
    def __init__(self, url: str) -> None:
        self.url, self.requests = url, 0


@pytest.fixture
async def streaming_upstream(aiohttp_server: Any) -> StreamingUpstream:
    async def stream(request: web.Request) -> web.StreamResponse:
        upstream.requests += 1
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)  # no Content-Length: chunked
        piece = b"s" * 65536
        for _ in range(STREAMED_BYTES // len(piece)):
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get(TRASH, stream)
    server = await aiohttp_server(app)
    upstream = StreamingUpstream(f"http://127.0.0.1:{server.port}")
    return upstream


@pytest.mark.e2e
async def test_a_slow_reader_of_a_streamed_answer_holds_no_upstream_slot(
    streaming_upstream: StreamingUpstream,
    fair_gateway: Callable[[str], GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    gateway = fair_gateway(streaming_upstream.url)
    viewer = {"Authorization": creds.bearer("VIEWER")}
    request = (
        f"GET {TRASH} HTTP/1.1\r\nHost: gateway\r\nAuthorization: {viewer['Authorization']}\r\n\r\n"
    ).encode()
    attack = Attack(gateway.port, request, MAX_CONCURRENT, 20)
    try:
        attack.start()
        await settled(lambda: streaming_upstream.requests)
        assert in_flight(gateway) >= MAX_CONCURRENT  # each waits on its caller
        for _ in range(3):
            await served_within(http_session, gateway.url + TRASH, viewer, SEND_TIMEOUT_S / 2)
    finally:
        attack.stop()


# --- in-process: the two rules of gateway/protocol.py -------------------------------------


@pytest.fixture
async def serve_bounded() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.ServerRunner] = []

    async def start(handler: Callable[..., Any], send_timeout_s: float) -> int:
        def refuse(request: web.BaseRequest, status: int, exc: BaseException | None) -> Any:
            return web.Response(status=status)

        server = GatewayServer(handler, refuse, send_timeout_s=lambda: send_timeout_s)
        runner = web.ServerRunner(server)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def never_reading(port: int, request: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


async def test_an_answer_not_taken_within_send_timeout_s_ends_the_connection(
    serve_bounded: Callable[..., Any],
) -> None:
    outcomes: list[BaseException] = []
    body = b"x" * (16 << 20)  # far more than the socket buffers take

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.Response(body=body)
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError as exc:
            outcomes.append(exc)
        return response

    port = await serve_bounded(handler, 0.5)
    started = time.monotonic()
    sock = never_reading(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        await poll(lambda: bool(outcomes), timeout_s=10)
        assert time.monotonic() - started >= 0.5
        assert isinstance(outcomes[0], SendTimeout)
        assert "send_timeout_s (0.5 s)" in str(outcomes[0])
        # The connection is gone: what the caller had not taken was dropped.
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
    finally:
        sock.close()


async def test_a_connection_waiting_on_its_caller_is_not_read_from(
    serve_bounded: Callable[..., Any],
) -> None:
    handled = 0
    body = b"y" * (4 * OUTPUT_BOUND_BYTES)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal handled
        handled += 1
        response = web.Response(body=body)
        await response.prepare(request)
        await response.write_eof()
        return response

    port = await serve_bounded(handler, 30)
    pipelined = 200
    sock = never_reading(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * pipelined)
    try:
        await poll(lambda: handled > 0)
        # Once the socket's buffers are full, no further request is taken.
        settled = -1
        while settled != handled:
            settled = handled
            await asyncio.sleep(0.5)
        assert handled < pipelined
    finally:
        sock.close()
