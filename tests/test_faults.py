"""A misbehaving upstream: every fault ends in the contract's answer, in time, and the
next request succeeds.

The upstream here is a raw asyncio server in the test process (real sockets; the
gateway is a real process in front of it). Each accepted request takes the next
behaviour from a script; once the script is used up, it answers 200.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from conftest import Creds, GatewayProc, Reply, poll

from gateway import signing
from gateway.sandbox import demo_record_id

pytestmark = pytest.mark.e2e

RESTORE = "/crm-core/v1/records/bulk/restore"
PLAIN = "/crm-core/v1/records/trash"
OK_BODY = b'{"ok":true}'

POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
principals:
  - name: test-member
    role: MEMBER
    token_sha256: "{digest}"
routes:
  - name: records-bulk-restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: MEMBER
    retry: {{on_throttle: true}}
    batch:
      field: recordIds
      max_items: 1000
      item_pattern: "^CRMRC[0-9]{{16}}[0-9A-Za-z]{{11}}$"
  - name: records-trash
    method: GET
    path: /crm-core/v1/records/trash
    min_role: MEMBER
"""

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def answer(status: int, body: bytes = OK_BODY, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def chunked_head(status: int) -> bytes:
    """The head of an answer whose length is not known in advance (chunked)."""
    return f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: what a crashed or killed peer looks like."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class FakeUpstream:
    script: list[Behaviour] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = dict(
                    line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
                )
                self.authorizations.append(headers.get("Authorization", ""))
                await reader.readexactly(int(headers.get("Content-Length", "0")))
                behaviour = self.script.pop(0) if self.script else ok
                if not await behaviour(reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def replying(status: int, body: bytes = OK_BODY, extra: str = "") -> Behaviour:
    """A behaviour that answers with ``status`` and keeps the connection."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(status, body, extra))
        await writer.drain()
        return True

    return reply


ok = replying(200)
THROTTLED = replying(429, b'{"errorCode":"TooManyRequests"}', "Retry-After: 0\r\n")


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    assert fake.server is not None
    fake.server.close()


@pytest.fixture
def gateway_for(
    start_policy_gateway: Callable[..., GatewayProc], creds: Creds
) -> Callable[..., GatewayProc]:
    import hashlib

    digest = hashlib.sha256(creds.tokens["MEMBER"].encode()).hexdigest()

    def start(upstream_url: str, timeout_s: float = 1.5) -> GatewayProc:
        return start_policy_gateway(
            POLICY.format(digest=digest), upstream_url=upstream_url, timeout_s=timeout_s,
            connect_timeout_s=0.5,
        )  # fmt: skip

    return start


async def restore(gw: GatewayProc, creds: Creds, session: aiohttp.ClientSession) -> Reply:
    body = b'{"recordIds": ["%s"]}' % demo_record_id("TRASH", 1).encode()
    headers = {
        "Authorization": f"Bearer {creds.tokens['MEMBER']}",
        "Content-Type": "application/json",
    }
    return await gw.send(session, "POST", RESTORE, headers=headers, data=body)


async def trash(gw: GatewayProc, creds: Creds, session: aiohttp.ClientSession) -> Reply:
    headers = {"Authorization": f"Bearer {creds.tokens['MEMBER']}"}
    return await gw.send(session, "GET", PLAIN, headers=headers)


async def timed(coro: Awaitable[Reply]) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = await coro
    return reply, time.monotonic() - started


def assert_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["X-Gateway-Error"] == code
    assert reply.json()["errorCode"] == code


async def logged(gw: GatewayProc, requests: int) -> list[dict[str, Any]]:
    """The access lines once there are ``requests`` of them: a relayed answer reaches
    the caller just before its line (and its metrics) are written."""
    await poll(lambda: len(gw.access_lines()) >= requests)
    return gw.access_lines()


def metric(gw: GatewayProc, prefix: str) -> dict[str, float]:
    _, text = gw.admin("/metrics")
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith(prefix)
    }


# --- the faults ----------------------------------------------------------------------


async def test_connection_refused_is_502_then_recovers(
    gateway_for: Callable[..., GatewayProc], creds: Creds, http_session: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = gateway_for(f"http://127.0.0.1:{port}")
    reply, took = await timed(restore(gw, creds, http_session))
    assert_error(reply, 502, "UpstreamUnavailable")
    assert took < 1.5
    fake = FakeUpstream()
    await fake.start(port)  # upstream comes back on the same address
    try:
        assert (await restore(gw, creds, http_session)).status == 200
    finally:
        assert fake.server is not None
        fake.server.close()


async def test_no_answer_is_504_within_timeout_then_recovers(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    upstream.script = [silent]
    gw = gateway_for(upstream.url, timeout_s=1.0)
    reply, took = await timed(restore(gw, creds, http_session))
    assert_error(reply, 504, "UpstreamTimeout")
    assert 0.9 < took < 2.0
    assert len(upstream.authorizations) == 1  # a request that reached upstream is not repeated
    assert (await restore(gw, creds, http_session)).status == 200
    await logged(gw, 2)
    assert metric(gw, "gateway_upstream_errors_total") == {
        'gateway_upstream_errors_total{kind="timeout",route="records-bulk-restore"}': 1.0
    }


async def test_reset_before_the_headers_is_502_and_not_retried(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        reset(writer)
        return False

    upstream.script = [rst]
    gw = gateway_for(upstream.url)
    reply = await restore(gw, creds, http_session)
    assert_error(reply, 502, "UpstreamUnavailable")
    assert len(upstream.authorizations) == 1  # upstream may have acted: never sent twice
    assert (await restore(gw, creds, http_session)).status == 200
    access = await logged(gw, 2)
    assert access[0]["attempts"] == 1 and access[0]["status"] == 502


async def test_reset_half_way_through_a_framed_body_is_502_before_anything_is_sent(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(200, b"x" * 1000)[:-900])  # headers promise 1000 bytes, 100 follow
        await writer.drain()
        await asyncio.sleep(0.1)
        reset(writer)
        return False

    upstream.script = [half]
    gw = gateway_for(upstream.url)
    # An answer this size is read whole before the caller gets a byte of it, so
    # the caller gets a complete error instead of a truncated 200.
    assert_error(await trash(gw, creds, http_session), 502, "UpstreamUnavailable")
    assert (await trash(gw, creds, http_session)).status == 200
    assert (await logged(gw, 2))[0]["status"] == 502


async def test_reset_half_way_through_a_streamed_body_cuts_the_callers_connection(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(chunked_head(200) + chunk(b"x" * 100))  # no length: streamed as it comes
        await writer.drain()
        await asyncio.sleep(0.1)
        reset(writer)
        return False

    upstream.script = [half]
    gw = gateway_for(upstream.url)
    headers = {"Authorization": f"Bearer {creds.tokens['MEMBER']}"}
    async with http_session.get(gw.url + PLAIN, headers=headers) as response:
        assert response.status == 200  # the status line was already passed on
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # ...so the caller sees a truncated body, not a whole one
    assert (await trash(gw, creds, http_session)).status == 200
    cut = (await logged(gw, 2))[0]
    assert "mid-body" in cut["reason"]


async def test_an_upstream_5xx_is_passed_back_as_it_is(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    upstream.script = [replying(500, b'{"errorCode":"InternalError"}')]
    gw = gateway_for(upstream.url)
    reply = await trash(gw, creds, http_session)
    assert reply.status == 500 and "X-Gateway-Error" not in reply.headers
    assert reply.json() == {"errorCode": "InternalError"}
    assert len(upstream.authorizations) == 1
    assert (await trash(gw, creds, http_session)).status == 200
    await logged(gw, 2)
    assert metric(gw, "gateway_upstream_errors_total") == {}  # an answer, not a failure


async def test_a_429_is_retried_with_a_new_signature_on_routes_that_opt_in(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    upstream.script = [THROTTLED]
    gw = gateway_for(upstream.url)
    reply = await restore(gw, creds, http_session)
    assert reply.status == 200
    assert len(upstream.authorizations) == 2
    salts = {signing.parse(a).salt for a in upstream.authorizations}
    assert len(salts) == 2  # every attempt is signed afresh
    assert (await logged(gw, 1))[0]["attempts"] == 2
    assert metric(gw, "gateway_upstream_retries_total") == {
        'gateway_upstream_retries_total{reason="throttle",route="records-bulk-restore"}': 1.0
    }


async def test_a_429_passes_through_where_the_route_did_not_opt_in(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    upstream.script = [THROTTLED]
    gw = gateway_for(upstream.url)
    reply = await trash(gw, creds, http_session)
    assert reply.status == 429 and reply.headers["Retry-After"] == "0"
    assert len(upstream.authorizations) == 1


async def test_a_429_whose_retry_after_does_not_fit_is_passed_back_at_once(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    upstream.script = [replying(429, b"{}", "Retry-After: 60\r\n")]
    gw = gateway_for(upstream.url)
    reply, took = await timed(restore(gw, creds, http_session))
    assert reply.status == 429 and took < 1.0
    assert len(upstream.authorizations) == 1


@pytest.mark.parametrize("framed", [True, False], ids=["framed", "streamed"])
@pytest.mark.parametrize(("pieces", "status"), [(5, 200), (40, None)])
async def test_a_trickling_body_is_relayed_or_cut_at_the_timeout(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
    pieces: int,
    status: int | None,
    framed: bool,
) -> None:
    body = b"y" * pieces * 10

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if framed:
            whole = answer(200, body)
            writer.write(whole[: len(whole) - len(body)])
        else:
            writer.write(chunked_head(200))
        for i in range(pieces):
            piece = body[i * 10 : (i + 1) * 10]
            writer.write(piece if framed else chunk(piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        if not framed:
            writer.write(b"0\r\n\r\n")
        return True

    upstream.script = [trickle]
    gw = gateway_for(upstream.url, timeout_s=1.0)  # 5 pieces take 0.25 s; 40 take 2 s
    headers = {"Authorization": f"Bearer {creds.tokens['MEMBER']}"}
    started = time.monotonic()
    async with http_session.get(gw.url + PLAIN, headers=headers) as response:
        if status == 200:
            assert response.status == 200
            assert await response.read() == body
        elif framed:  # read whole, so the timeout is still the gateway's to answer
            assert response.status == 504
            assert response.headers["X-Gateway-Error"] == "UpstreamTimeout"
        else:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert time.monotonic() - started < 1.8  # cut at timeout_s, not when upstream ends
    assert (await trash(gw, creds, http_session)).status == 200


async def test_a_pooled_connection_closed_as_the_next_post_is_sent(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def close_when_reused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False  # the request arrived on a kept-alive connection: hang up, answer nothing

    upstream.script = [ok, close_when_reused]
    gw = gateway_for(upstream.url)
    assert (await restore(gw, creds, http_session)).status == 200
    reply = await restore(gw, creds, http_session)
    # A POST that may have reached upstream is never sent again: an honest 502.
    assert_error(reply, 502, "UpstreamUnavailable")
    assert len(upstream.authorizations) == 2
    assert (await restore(gw, creds, http_session)).status == 200  # a new connection


async def test_the_gateway_survives_all_of_it(
    upstream: FakeUpstream,
    gateway_for: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        reset(writer)
        return False

    upstream.script = [rst] * 20
    gw = gateway_for(upstream.url)
    replies: list[Any] = await asyncio.gather(
        *(restore(gw, creds, http_session) for _ in range(20))
    )
    assert sorted(r.status for r in replies) == [502] * 20
    assert (await restore(gw, creds, http_session)).status == 200
    assert gw.admin("/readyz")[0] == 200
