"""gateway/upstream.py: retries only where safe, one time budget, a bounded number in flight.

These run the real client against real sockets served in-process; the same rules
on a scripted transport in fake time are tests/test_retry.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import signing
from gateway.config import UpstreamSettings
from gateway.errors import Overloaded, UpstreamTimeout, UpstreamUnavailable
from gateway.retry import MAX_ATTEMPTS, Tally
from gateway.signing import Secret, Signer
from gateway.transport import UpstreamRequest
from gateway.upstream import Upstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SIGNER = Signer("NCSTEST000000001", Secret("upstream-test-secret"))


def settings(port: int, timeout_s: float = 2.0, **extra: float) -> UpstreamSettings:
    return UpstreamSettings(
        url=URL(f"http://127.0.0.1:{port}"),
        connect_timeout_s=min(1.0, timeout_s),
        timeout_s=timeout_s,
        **extra,  # type: ignore[arg-type]
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    client = Upstream()
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def serve(aiohttp_server) -> Callable[[Handler], Awaitable[int]]:  # type: ignore[no-untyped-def]
    async def start(handler: Handler) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app)
        return int(server.port)

    return start


async def call(
    upstream: Upstream, conf: UpstreamSettings, tally: Tally, *, on_throttle: bool = False
) -> int:
    request = UpstreamRequest(
        "POST", "/crm-core/v1/records/bulk/restore?x=1", CIMultiDict(), b"{}",
        on_throttle=on_throttle,
    )  # fmt: skip
    answer = await upstream.exchange(request, conf, SIGNER.fresh_header, tally)
    status = answer.status
    answer.release()
    return status


async def test_a_refused_connection_is_retried_then_502(upstream: Upstream) -> None:
    tally = Tally()
    with pytest.raises(UpstreamUnavailable):
        await call(upstream, settings(closed_port()), tally)
    assert tally.attempts == MAX_ATTEMPTS
    assert tally.failures == ["connect"] * MAX_ATTEMPTS
    assert tally.retries == ["connect"] * (MAX_ATTEMPTS - 1)


async def test_throttled_answers_are_retried_on_opt_in_with_fresh_signatures(
    upstream: Upstream, serve: Callable[[Handler], Awaitable[int]]
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        if len(seen) < 3:
            return web.Response(status=429, headers={"Retry-After": "0"})
        return web.Response(text="ok")

    port = await serve(handler)
    tally = Tally()
    assert await call(upstream, settings(port), tally, on_throttle=True) == 200
    assert tally.retries == ["throttle", "throttle"] and tally.attempts == 3
    salts = {signing.parse(h).salt for h in seen}
    assert len(salts) == 3  # every tally is signed afresh


async def test_throttled_answers_pass_through_without_opt_in(
    upstream: Upstream, serve: Callable[[Handler], Awaitable[int]]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "0"})

    tally = Tally()
    assert await call(upstream, settings(await serve(handler)), tally) == 503
    assert tally.attempts == 1 and tally.retries == []


async def test_a_retry_after_beyond_the_budget_is_not_waited_for(
    upstream: Upstream, serve: Callable[[Handler], Awaitable[int]]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "5"})

    tally = Tally()
    started = time.monotonic()
    status = await call(upstream, settings(await serve(handler), 1.0), tally, on_throttle=True)
    assert status == 429 and tally.attempts == 1
    assert time.monotonic() - started < 0.5


async def test_no_answer_is_504_within_the_budget_and_not_retried(
    upstream: Upstream, serve: Callable[[Handler], Awaitable[int]]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    tally = Tally()
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await call(upstream, settings(await serve(handler), 0.5), tally)
    assert 0.4 < time.monotonic() - started < 1.5
    assert tally.attempts == 1 and tally.failures == ["timeout"]


async def test_a_reset_after_sending_is_not_retried(
    upstream: Upstream, serve: Callable[[Handler], Awaitable[int]]
) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        assert request.transport is not None
        request.transport.abort()  # upstream may have acted: repeating could double it
        return web.Response()

    tally = Tally()
    with pytest.raises(UpstreamUnavailable):
        await call(upstream, settings(await serve(handler)), tally)
    assert calls == 1 and tally.attempts == 1 and tally.failures == ["reset"]


async def test_only_max_concurrent_exchanges_run_then_overloaded(
    upstream: Upstream, serve: Callable[[Handler], Awaitable[int]]
) -> None:
    conf = settings(closed_port(), max_concurrent=2, queue_timeout_s=0.05)
    held = [await upstream.acquire_slot(conf), await upstream.acquire_slot(conf)]
    started = time.monotonic()
    with pytest.raises(Overloaded) as err:
        await upstream.acquire_slot(conf)
    assert err.value.status == 503 and time.monotonic() - started < 0.5
    held[0].release()
    (await upstream.acquire_slot(conf)).release()  # a freed slot is usable again
    held[1].release()
