"""gateway/admin.py: /healthz, /readyz and /metrics, told about the process by one View."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import admin
from gateway.config import Address
from gateway.metrics import CONTENT_TYPE, Metrics

MakeClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


async def test_readyz_follows_the_process_and_healthz_does_not(
    aiohttp_client: MakeClient,
) -> None:
    ready = [False]
    client = await aiohttp_client(admin.app(admin.View(Metrics(), lambda: ready[0])))
    for expected, body in ((503, {"status": "draining"}), (200, {"status": "ready"})):
        answer = await client.get("/readyz")
        assert (answer.status, await answer.json()) == (expected, body)
        health = await client.get("/healthz")
        assert (health.status, await health.json()) == (200, {"status": "ok"})
        ready[0] = True


async def test_metrics_are_the_views_and_admin_requests_are_not_counted(
    aiohttp_client: MakeClient,
) -> None:
    metrics = Metrics()
    metrics.request("records-bulk-restore", "POST", 200, 0.01)
    client = await aiohttp_client(admin.app(admin.View(metrics, lambda: True)))
    for _ in range(2):
        answer = await client.get("/metrics")
        assert answer.status == 200
        assert answer.headers["Content-Type"] == CONTENT_TYPE
        text = await answer.text()
        assert "gateway_build_info{" in text
        line = 'gateway_requests_total{method="POST",route="records-bulk-restore",status="200"} 1.0'
        assert line in text
        assert text.count("gateway_requests_total{") == 1


async def test_a_taken_address_is_an_oserror_and_leaves_nothing_open(unused_tcp_port: int) -> None:
    view = admin.View(Metrics(), lambda: True)
    address = Address("127.0.0.1", unused_tcp_port)
    first = await admin.start(address, view)
    try:
        with pytest.raises(OSError):
            await admin.start(address, view)
    finally:
        await first.cleanup()
    again = await admin.start(address, view)  # the port is free once the first is gone
    await again.cleanup()
