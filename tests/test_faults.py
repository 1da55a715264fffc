"""A misbehaving upstream: every fault ends in the contract's answer, in time, and the
next request succeeds.

The upstream here is a raw asyncio server in the test process (real sockets; the
gateway is a real process in front of it). Each accepted request takes the next
behaviour from a script; once the script is used up, it answers 200.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from support import (
    Behaviour,
    Creds,
    FakeUpstream,
    GatewayProc,
    Labels,
    Received,
    Reply,
    answer,
    chunk,
    chunked_head,
    family,
    free_port,
    hang,
    ids_body,
    labelled,
    ok,
    poll,
    replying,
    reset,
    token_principals,
)

from gateway import signing
from gateway.sandbox import demo_record_id

pytestmark = pytest.mark.e2e

RESTORE = "/crm-core/v1/records/bulk/restore"
PLAIN = "/crm-core/v1/records/trash"

POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
principals:
{principals}\
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
TIMEOUT_S = 1.0  # the upstream timeout of the faults that wait for it
# Where nothing should wait for the timeout, one so long that waiting for it shows.
PATIENT_TIMEOUT_S = 20.0

THROTTLED = replying(429, b'{"errorCode":"TooManyRequests"}', "Retry-After: 0\r\n")


@dataclass
class Faulty:
    """A gateway with the routes above in front of the fake upstream, and its caller."""

    gateway: GatewayProc
    upstream: FakeUpstream
    creds: Creds
    session: aiohttp.ClientSession

    async def restore(self) -> Reply:
        body = ids_body([demo_record_id("TRASH", 1)])
        headers = {
            "Authorization": self.creds.bearer("MEMBER"),
            "Content-Type": "application/json",
        }
        return await self.gateway.send(self.session, "POST", RESTORE, headers=headers, data=body)

    async def trash(self) -> Reply:
        headers = {"Authorization": self.creds.bearer("MEMBER")}
        return await self.gateway.send(self.session, "GET", PLAIN, headers=headers)

    async def logged(self, requests: int) -> list[dict[str, Any]]:
        """The access lines once there are ``requests`` of them: a relayed answer reaches
        the caller just before its line (and its metrics) are written."""
        await poll(lambda: len(self.gateway.access_lines()) >= requests)
        return self.gateway.access_lines()

    def metric(self, name: str) -> dict[Labels, float]:
        return family(self.gateway.metrics(), name)


@pytest.fixture
def behind(
    fake_upstream: FakeUpstream,
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> Callable[..., Faulty]:
    """``behind(*script, timeout_s=1.5, upstream_url=None)``: the fake upstream follows
    ``script``, a new gateway stands in front of it (or of ``upstream_url``)."""
    policy = POLICY.format(principals=token_principals(creds.tokens))

    def start(
        *script: Behaviour, timeout_s: float = 1.5, upstream_url: str | None = None
    ) -> Faulty:
        fake_upstream.script = list(script)
        gateway = start_gateway(
            upstream_url or fake_upstream.url,
            policy=policy,
            timeout_s=timeout_s,
            connect_timeout_s=0.5,
        )
        return Faulty(gateway, fake_upstream, creds, http_session)

    return start


async def timed(coro: Awaitable[Reply]) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = await coro
    return reply, time.monotonic() - started


def assert_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["X-Gateway-Error"] == code
    assert reply.json()["errorCode"] == code


# --- the faults ----------------------------------------------------------------------


async def test_connection_refused_is_502_then_recovers(behind: Callable[..., Faulty]) -> None:
    port = free_port()
    fault = behind(upstream_url=f"http://127.0.0.1:{port}", timeout_s=PATIENT_TIMEOUT_S)
    reply, took = await timed(fault.restore())
    assert_error(reply, 502, "UpstreamUnavailable")
    assert took < PATIENT_TIMEOUT_S / 2  # refused at once: no time budget waited out
    async with FakeUpstream() as back:
        await back.stop()
        await back.start(port)  # upstream comes back on the same address
        assert (await fault.restore()).status == 200


async def test_no_answer_is_504_within_timeout_then_recovers(
    behind: Callable[..., Faulty],
) -> None:
    fault = behind(hang, timeout_s=TIMEOUT_S)  # the first request is never answered
    reply, took = await timed(fault.restore())
    assert_error(reply, 504, "UpstreamTimeout")
    # At timeout_s: not before, and not at some other, far later, limit.
    assert TIMEOUT_S * 0.9 < took < TIMEOUT_S * 10
    assert len(fault.upstream.received) == 1  # a request that reached upstream is not repeated
    assert (await fault.restore()).status == 200
    access = await fault.logged(2)
    assert access[0]["reason"] == "upstream did not answer in time (1 attempt(s))"
    assert fault.metric("gateway_upstream_errors_total") == {
        labelled(kind="timeout", route="records-bulk-restore"): 1.0
    }


async def test_reset_before_the_headers_is_502_and_not_retried(
    behind: Callable[..., Faulty],
) -> None:
    fault = behind(reset)
    assert_error(await fault.restore(), 502, "UpstreamUnavailable")
    assert len(fault.upstream.received) == 1  # upstream may have acted: never sent twice
    assert (await fault.restore()).status == 200
    access = await fault.logged(2)
    assert access[0]["attempts"] == 1 and access[0]["status"] == 502
    # The line says why there was no answer (the caller is told only the errorCode).
    assert access[0]["reason"] == "upstream closed the connection (1 attempt(s))"


async def test_reset_half_way_through_a_framed_body_is_502_before_anything_is_sent(
    behind: Callable[..., Faulty],
) -> None:
    async def half(received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(200, b"x" * 1000)[:-900])  # headers promise 1000 bytes, 100 follow
        await writer.drain()
        await asyncio.sleep(0.1)
        return await reset(received, writer)

    fault = behind(half)
    # An answer this size is read whole before the caller gets a byte of it, so
    # the caller gets a complete error instead of a truncated 200.
    assert_error(await fault.trash(), 502, "UpstreamUnavailable")
    assert (await fault.trash()).status == 200
    assert (await fault.logged(2))[0]["status"] == 502


async def test_reset_half_way_through_a_streamed_body_cuts_the_callers_connection(
    behind: Callable[..., Faulty],
) -> None:
    async def half(received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(chunked_head(200) + chunk(b"x" * 100))  # no length: streamed as it comes
        await writer.drain()
        await asyncio.sleep(0.1)
        return await reset(received, writer)

    fault = behind(half)
    headers = {"Authorization": fault.creds.bearer("MEMBER")}
    async with fault.session.get(fault.gateway.url + PLAIN, headers=headers) as response:
        assert response.status == 200  # the status line was already passed on
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # ...so the caller sees a truncated body, not a whole one
    assert (await fault.trash()).status == 200
    cut = (await fault.logged(2))[0]
    assert "mid-body" in cut["reason"]


async def test_an_upstream_5xx_is_passed_back_as_it_is(behind: Callable[..., Faulty]) -> None:
    fault = behind(replying(500, b'{"errorCode":"InternalError"}'))
    reply = await fault.trash()
    assert reply.status == 500 and "X-Gateway-Error" not in reply.headers
    assert reply.json() == {"errorCode": "InternalError"}
    assert len(fault.upstream.received) == 1
    assert (await fault.trash()).status == 200
    await fault.logged(2)
    assert fault.metric("gateway_upstream_errors_total") == {}  # an answer, not a failure


async def test_a_429_is_retried_with_a_new_signature_on_routes_that_opt_in(
    behind: Callable[..., Faulty],
) -> None:
    fault = behind(THROTTLED)
    assert (await fault.restore()).status == 200
    assert len(fault.upstream.received) == 2
    salts = {signing.parse(a).salt for a in fault.upstream.authorizations}
    assert len(salts) == 2  # every attempt is signed afresh
    assert (await fault.logged(1))[0]["attempts"] == 2
    assert fault.metric("gateway_upstream_retries_total") == {
        labelled(reason="throttle", route="records-bulk-restore"): 1.0
    }


async def test_a_429_passes_through_where_the_route_did_not_opt_in(
    behind: Callable[..., Faulty],
) -> None:
    fault = behind(THROTTLED)
    reply = await fault.trash()
    assert reply.status == 429 and reply.headers["Retry-After"] == "0"
    assert len(fault.upstream.received) == 1


async def test_a_429_whose_retry_after_does_not_fit_is_passed_back_at_once(
    behind: Callable[..., Faulty],
) -> None:
    retry_after = f"Retry-After: {3 * PATIENT_TIMEOUT_S:.0f}\r\n"
    fault = behind(replying(429, b"{}", retry_after), timeout_s=PATIENT_TIMEOUT_S)
    reply, took = await timed(fault.restore())
    # Neither the pause nor the rest of the time budget was waited out.
    assert reply.status == 429 and took < PATIENT_TIMEOUT_S / 2
    assert len(fault.upstream.received) == 1


@pytest.mark.parametrize("framed", [True, False], ids=["framed", "streamed"])
@pytest.mark.parametrize(
    ("pieces", "timeout_s", "status"),
    [(5, PATIENT_TIMEOUT_S, 200), (400, TIMEOUT_S, None)],
    ids=["relayed", "cut"],
)
async def test_a_trickling_body_is_relayed_or_cut_at_the_timeout(
    behind: Callable[..., Faulty], pieces: int, timeout_s: float, status: int | None, framed: bool
) -> None:
    body = b"y" * pieces * 10
    pause_s = 0.05
    trickle_s = pieces * pause_s  # 0.25 s: well inside its timeout; 20 s: far beyond its own

    async def trickle(received: Received, writer: asyncio.StreamWriter) -> bool:
        if framed:
            whole = answer(200, body)
            writer.write(whole[: len(whole) - len(body)])
        else:
            writer.write(chunked_head(200))
        for i in range(pieces):
            piece = body[i * 10 : (i + 1) * 10]
            writer.write(piece if framed else chunk(piece))
            await writer.drain()
            await asyncio.sleep(pause_s)
        if not framed:
            writer.write(b"0\r\n\r\n")
        return True

    fault = behind(trickle, timeout_s=timeout_s)
    headers = {"Authorization": fault.creds.bearer("MEMBER")}
    started = time.monotonic()
    async with fault.session.get(fault.gateway.url + PLAIN, headers=headers) as response:
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
        # Cut at timeout_s, not when upstream ends.
        assert time.monotonic() - started < (timeout_s + trickle_s) / 2
    assert (await fault.trash()).status == 200


async def test_a_pooled_connection_closed_as_the_next_post_is_sent(
    behind: Callable[..., Faulty],
) -> None:
    async def close_when_reused(received: Received, writer: asyncio.StreamWriter) -> bool:
        return False  # the request arrived on a kept-alive connection: hang up, answer nothing

    fault = behind(ok, close_when_reused)
    assert (await fault.restore()).status == 200
    # A POST that may have reached upstream is never sent again: an honest 502.
    assert_error(await fault.restore(), 502, "UpstreamUnavailable")
    assert len(fault.upstream.received) == 2
    assert (await fault.restore()).status == 200  # a new connection


async def test_the_gateway_survives_all_of_it(behind: Callable[..., Faulty]) -> None:
    fault = behind(*[reset] * 20)
    replies: list[Reply] = await asyncio.gather(*(fault.restore() for _ in range(20)))
    assert sorted(r.status for r in replies) == [502] * 20
    assert (await fault.restore()).status == 200
    assert fault.gateway.admin("/readyz")[0] == 200
