"""gateway/service.py: one way out of ``serve``, whether it failed to start or drained.

These run ``serve`` in the test's own process and loop; the end-to-end tests
(test_operations.py) run it as ``solapi-gateway serve`` and check the drain
under load.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway import config, service
from gateway.config import Address, Settings
from gateway.server import Gateway

DEMO_CONFIG = Path(__file__).parent.parent / "config" / "demo" / "gateway.yaml"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


@pytest.fixture
def settings(unused_tcp_port_factory: Callable[[], int]) -> Settings:
    ports = [unused_tcp_port_factory() for _ in range(2)]
    loaded = config.load(str(DEMO_CONFIG))
    return loaded.model_copy(
        update={
            "listen": Address("127.0.0.1", ports[0]),
            "admin_listen": Address("127.0.0.1", ports[1]),
            "shutdown_grace_s": 1.0,
        }
    )


@pytest.fixture
def handlers_before() -> Iterator[dict[signal.Signals, object]]:
    yield {sig: signal.getsignal(sig) for sig in SIGNALS}


def events(captured: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in captured.splitlines() if line.startswith("{")]


def can_bind(address: Address) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address.host, address.port))
        except OSError:
            return False
    return True


async def test_a_start_that_fails_lets_go_of_everything_it_started(
    settings: Settings,
    handlers_before: dict[signal.Signals, object],
    capfd: pytest.CaptureFixture[str],
) -> None:
    # The admin port is bound before the proxy port, so it is open when the proxy fails.
    with socket.socket() as taken:
        taken.bind((settings.listen.host, settings.listen.port))
        taken.listen()
        assert await service.serve(settings) == 1
    logged = events(capfd.readouterr().err)
    assert [e["event"] for e in logged] == ["start_failed"]
    assert str(logged[0]["error"]).startswith(f"cannot listen on {settings.listen}:")
    assert can_bind(settings.admin_listen)
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers_before


async def test_sigterm_drains_then_lets_go_of_everything(
    settings: Settings,
    handlers_before: dict[signal.Signals, object],
    capfd: pytest.CaptureFixture[str],
) -> None:
    readiness: list[int] = []

    async def ready(gateway: Gateway) -> None:
        url = f"http://{settings.admin_listen}/readyz"
        async with aiohttp.ClientSession() as session, session.get(url) as answer:
            readiness.append(answer.status)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by serve: it only asks it to stop

    assert await service.serve(settings, ready=ready) == 0
    assert readiness == [200]  # the proxy listened before ``ready`` was called
    names = [e["event"] for e in events(capfd.readouterr().err)]
    assert names == ["started", "draining", "stopped"]
    assert can_bind(settings.listen) and can_bind(settings.admin_listen)
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers_before
