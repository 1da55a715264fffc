"""Rate limits and shared state, end to end: real gateways, a real Redis, real sockets.

    redis_server   (session)   ``redis-server`` on a free loopback port, nothing persisted
    own_redis      (function)  a Redis of the test's own, to kill, stop and restart

Three ``serve`` processes (replicas, not workers) share one Redis: a header
accepted by one is refused by the others, and a limit holds across all three.
Redis killed, or too slow, costs HMAC callers a 503 within ``state.timeout_s``
and nobody else anything; it comes back by itself. With ``state: memory`` the
workers of one ``serve --workers 2`` share their limits. Each test is short.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import (
    Creds,
    GatewayProc,
    SandboxProc,
    free_port,
    ids_body,
    random_id,
    sample,
)
from support.procs import START_TIMEOUT_S

from gateway.signing import Secret, authorization, format_date, new_salt

pytestmark = pytest.mark.e2e

KEY_A, SECRET_A = "NCSINTLIMITS0001", "limits-secret-a-0123456789"
KEY_B, SECRET_B = "NCSINTLIMITS0002", "limits-secret-b-0123456789"
BALANCE = "/cash/v1/balance"
RESTORE = "/crm-core/v1/records/bulk/restore"


# --- a real Redis -----------------------------------------------------------------------------


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run installs it")
        pytest.skip("redis-server is not installed (.ci/run installs it before the tests)")
    return found


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@dataclass
class RedisProc:
    port: int
    workdir: Path
    password: str = ""
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 (kept by the child)
        self.popen = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers_ping(self.port):
            assert self.popen.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)


def launch_redis(workdir: Path, password: str = "") -> RedisProc:
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisProc(free_port(), workdir, password)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    server = launch_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProc]:
    server = launch_redis(tmp_path / "redis", password=f"pw{secrets.token_hex(8)}")
    yield server
    if server.popen is not None and server.popen.poll() is None:
        server.signal(signal.SIGCONT)  # in case a test left it stopped
    server.kill()


# --- the gateways -----------------------------------------------------------------------------


def policy(creds: Creds, limits: str) -> str:
    token = hashlib.sha256(creds.tokens["MEMBER"].encode()).hexdigest()
    return f"""\
roles: [VIEWER, MEMBER, OWNER]
principals:
  - {{name: test-member, role: MEMBER, token_sha256: "{token}"}}
  - {{name: sdk-a, role: MEMBER, hmac_key: "{KEY_A}", hmac_secret: "{SECRET_A}"}}
  - {{name: sdk-b, role: MEMBER, hmac_key: "{KEY_B}", hmac_secret: "{SECRET_B}"}}
routes:
  - name: cash-balance
    method: GET
    path: {BALANCE}
    min_role: VIEWER
  - name: records-trash
    method: GET
    path: /crm-core/v1/records/trash
    min_role: VIEWER
  - name: records-bulk-restore
    method: POST
    path: {RESTORE}
    min_role: MEMBER
    batch: {{field: recordIds, max_items: 1000}}
limits:{chr(10) + limits if limits else " []" + chr(10)}"""


def redis_state(server: RedisProc, **extra: Any) -> dict[str, Any]:
    prefix = f"t{secrets.token_hex(4)}:"  # each test its own keys in the shared Redis
    return {"state": {"backend": "redis", "url": server.url, "key_prefix": prefix, **extra}}


def sdk(key: str = KEY_A, secret: str = SECRET_A) -> dict[str, str]:
    date = format_date(datetime.now(UTC))
    return {"Authorization": authorization(key, Secret(secret), date, new_salt())}


def ids(n: int) -> bytes:
    return ids_body([random_id() for _ in range(n)])


async def status(
    session: aiohttp.ClientSession, gateway: GatewayProc, path: str = BALANCE, **kwargs: Any
) -> int:
    method = "POST" if "data" in kwargs else "GET"
    return (await gateway.send(session, method, path, **kwargs)).status


async def test_three_replicas_share_one_replay_memory_and_one_limit(
    start_gateway: Callable[..., GatewayProc],
    redis_server: RedisProc,
    creds: Creds,
    sandbox: SandboxProc,
    http_session: aiohttp.ClientSession,
) -> None:
    limits = "  - {name: per-service, key: principal, routes: [records-trash], requests_per_s: 1, burst: 5}\n"  # noqa: E501
    shared = redis_state(redis_server)
    a, b, c = (start_gateway(policy=policy(creds, limits), settings=shared) for _ in range(3))

    header = sdk()
    assert await status(http_session, a, headers=header) == 200
    with sandbox.untouched():
        assert await status(http_session, b, headers=header) == 401
        assert await status(http_session, c, headers=header) == 401
    assert "hmac reused (DuplicatedSignature)" in b.access_lines()[-1]["reason"]

    # 5 at once, then 1 a second, counted by Redis for all three replicas together.
    bearer = {"Authorization": creds.bearer("MEMBER")}
    started = time.monotonic()
    replies = []
    for i in range(30):
        gateway = (a, b, c)[i % 3]
        replies.append(
            await gateway.send(http_session, "GET", "/crm-core/v1/records/trash", headers=bearer)
        )
    elapsed = time.monotonic() - started
    statuses = [reply.status for reply in replies]
    passed = statuses.count(200)
    assert set(statuses) == {200, 429}
    assert 5 <= passed <= 5 + int(elapsed) + 1, (passed, elapsed)
    refused = next(reply for reply in replies if reply.status == 429)
    assert refused.json()["errorCode"] == "RateLimited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"] == '"per-service";q=5;w=5'
    assert refused.headers["RateLimit"].startswith('"per-service";r=0;t=')
    total = sum(
        sample(
            g.metrics(), "gateway_rate_limited_total", limit="per-service", route="records-trash"
        )
        for g in (a, b, c)
    )
    assert total >= 30 - passed


async def test_an_items_limit_refuses_a_batch_that_would_cross_it_and_lets_a_small_one_pass(
    start_gateway: Callable[..., GatewayProc],
    redis_server: RedisProc,
    creds: Creds,
    sandbox: SandboxProc,
    http_session: aiohttp.ClientSession,
) -> None:
    limits = "  - {name: records-per-minute, key: principal, routes: [records-bulk-restore], items_per_min: 1500}\n"  # noqa: E501
    settings = redis_state(redis_server)
    a, b = (start_gateway(policy=policy(creds, limits), settings=settings) for _ in range(2))
    body = {"Content-Type": "application/json", "Authorization": creds.bearer("MEMBER")}
    assert await status(http_session, a, RESTORE, headers=body, data=ids(600)) != 429
    with sandbox.untouched():
        refused = await b.send(http_session, "POST", RESTORE, headers=body, data=ids(1000))
    assert refused.status == 429, refused.body
    assert refused.headers["RateLimit-Policy"] == '"records-per-minute";q=1500;w=60;qu="items"'
    assert await status(http_session, b, RESTORE, headers=body, data=ids(10)) != 429
    # The refused batch consumed nothing: 890 are still left.
    assert await status(http_session, a, RESTORE, headers=body, data=ids(880)) != 429


async def test_redis_killed_or_stalled_costs_hmac_callers_a_503_and_comes_back_by_itself(
    start_gateway: Callable[..., GatewayProc],
    own_redis: RedisProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    limits = "  - {name: calls, key: principal, routes: [records-trash], requests_per_s: 100}\n"
    settings = redis_state(own_redis, timeout_s=0.2, on_error="open")
    gateway = start_gateway(policy=policy(creds, limits), settings=settings)
    bearer = {"Authorization": creds.bearer("MEMBER")}
    trash = "/crm-core/v1/records/trash"
    assert await status(http_session, gateway, headers=sdk()) == 200

    for outage in ("killed", "stalled"):
        if outage == "killed":
            own_redis.kill()
        else:
            own_redis.signal(signal.SIGSTOP)  # accepts connections, answers nothing
        started = time.monotonic()
        refused = await gateway.send(http_session, "GET", BALANCE, headers=sdk())
        waited = time.monotonic() - started
        assert refused.status == 503 and refused.json()["errorCode"] == "StateUnavailable"
        assert waited < 3, waited  # timeout_s is 0.2: generous for a loaded machine
        assert await status(http_session, gateway, headers=bearer) == 200  # no limit on it
        assert await status(http_session, gateway, trash, headers=bearer) == 200  # on_error open
        assert gateway.admin("/readyz")[0] == 200  # the replica stays in the load balancer
        if outage == "killed":
            own_redis.start()  # same port, empty
        else:
            own_redis.signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while await status(http_session, gateway, headers=sdk()) != 200:
            assert time.monotonic() < deadline, "the gateway did not recover"
            await asyncio.sleep(0.1)

    errors = gateway.metrics()
    assert sample(errors, "gateway_state_errors_total", op="replay") >= 2
    assert sample(errors, "gateway_state_errors_total", op="limits") >= 2
    events = [e["event"] for e in gateway.events()]
    assert "state_unavailable" in events and "state_recovered" in events
    assert own_redis.password not in gateway.proc.stderr_text()
    assert own_redis.password not in gateway.admin("/metrics")[1].decode()


async def test_one_key_filling_its_replay_share_does_not_lock_out_another(
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    # Two internal keys: 10 remembered salts each.
    gateway = start_gateway(policy=policy(creds, ""), settings={"state": {"replay_salts": 20}})
    for _ in range(10):
        assert await status(http_session, gateway, headers=sdk()) == 200
    assert await status(http_session, gateway, headers=sdk()) == 401
    assert gateway.access_lines()[-1]["reason"].endswith(
        f"replay memory full for this key, apiKey {KEY_A}"
    )
    assert await status(http_session, gateway, headers=sdk(KEY_B, SECRET_B)) == 200


async def test_the_workers_of_one_serve_share_their_limits(
    start_gateway: Callable[..., GatewayProc], creds: Creds, sandbox: SandboxProc
) -> None:
    limits = "  - {name: per-minute, key: principal, routes: ['*'], requests_per_min: 5}\n"
    gateway = start_gateway(policy=policy(creds, limits), workers=2)
    bearer = {"Authorization": creds.bearer("MEMBER")}
    connector = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = [await status(session, gateway, headers=bearer) for _ in range(12)]
    assert statuses.count(200) == 5, statuses  # the refill is one each 12 s
    started = {e.get("pid") for e in gateway.events() if e.get("event") == "started"}
    assert len(started - {gateway.proc.pid}) == 2  # two workers answered them


async def test_a_reload_keeps_the_counters_of_a_limit_left_alone_and_resets_an_edited_one(
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    limit = "  - {name: per-minute, key: principal, routes: ['*'], requests_per_min: 2}\n"
    gateway = start_gateway(policy=policy(creds, limit))
    bearer = {"Authorization": creds.bearer("MEMBER")}
    assert [await status(http_session, gateway, headers=bearer) for _ in range(3)] == [
        200, 200, 429,
    ]  # fmt: skip
    policy_file = gateway.config_path.parent / "policy.yaml"

    async def reload(text: str) -> None:
        policy_file.write_text(text)
        reloads = sum(e["event"] == "reloaded" for e in gateway.events())
        gateway.proc.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while sum(e["event"] == "reloaded" for e in gateway.events()) == reloads:
            assert time.monotonic() < deadline, "no reload"
            await asyncio.sleep(0.05)

    await reload(policy(creds, limit) + "# touched, the limit itself unchanged\n")
    assert await status(http_session, gateway, headers=bearer) == 429  # still counted
    await reload(policy(creds, limit.replace("requests_per_min: 2", "requests_per_min: 3")))
    assert await status(http_session, gateway, headers=bearer) == 200  # a fresh bucket
