"""The replay memory (gateway/replay.py) and the file workers share (gateway/statefile.py).

Both refuse a reused salt, bound each internal key to its share so that one
key cannot lock out another, forget a partition once its signatures cannot
verify any more, and keep a salt in far less than 64 bytes. The file is
atomic across real processes racing for the same salts, never blocks the
event loop on a lock another worker holds, and, end to end, lets a replayed
SDK header through once in all, not once per worker.
"""

from __future__ import annotations

import ast
import asyncio
import multiprocessing
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Creds, GatewayProc, SandboxProc, poll, principal_yaml

from gateway import replay
from gateway.replay import FULL, REUSED, ReplayMemory
from gateway.signing import WINDOW_S, Secret, authorization, format_date, new_salt
from gateway.statefile import StateError, StateFile

HMAC_KEY = "NCSINTREPLAY0001"
HMAC_SECRET = "replay-test-secret-0123456789"
NOW = 1_800_000_000.0
BIG = 10**9


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "state.sqlite3")


class FileMemory:
    """A ``StateFile`` with ``ReplayMemory``'s call, for the shared table of tests."""

    def __init__(self, path: str) -> None:
        self.file = StateFile(path, timeout_s=5.0)

    def remember(self, key: str, salt: str, signed_at: float, now: float, limit: int) -> str | None:
        return asyncio.run(self.file.remember(key, salt, signed_at, now, limit))


def memories(db_path: str) -> list[Any]:
    return [ReplayMemory(), FileMemory(db_path)]


@pytest.mark.parametrize("kind", [0, 1], ids=["in-process", "file"])
def test_a_salt_is_accepted_once_and_refused_while_its_signature_could_verify(
    kind: int, db_path: str
) -> None:
    memory = memories(db_path)[kind]
    assert memory.remember("K1", "salt-one", NOW, NOW, BIG) is None
    assert memory.remember("K1", "salt-one", NOW, NOW + 60, BIG) == REUSED
    assert memory.remember("K2", "salt-one", NOW, NOW, BIG) is None  # another key's salt
    assert memory.remember("K1", "salt-two", NOW, NOW, BIG) is None
    # Until date + window + margin it is still refused; after that the skew check
    # would refuse the header anyway, and the memory has let it go.
    late = NOW + WINDOW_S + replay.MARGIN_S
    assert memory.remember("K1", "salt-one", NOW, late - replay.PARTITION_S, BIG) == REUSED
    assert memory.remember("K1", "salt-one", NOW, late + replay.PARTITION_S + 1, BIG) is None


@pytest.mark.parametrize("kind", [0, 1], ids=["in-process", "file"])
def test_a_key_that_fills_its_share_is_refused_and_the_others_are_not(
    kind: int, db_path: str
) -> None:
    memory = memories(db_path)[kind]
    for i in range(5):
        assert memory.remember("FLOOD", f"salt-{i:04d}", NOW, NOW, 5) is None
    assert memory.remember("FLOOD", "salt-new-000", NOW, NOW, 5) == FULL
    assert memory.remember("FLOOD", "salt-0003", NOW, NOW, 5) == REUSED  # a replay is still one
    assert memory.remember("QUIET", "salt-0000", NOW, NOW, 5) is None  # unaffected
    # Once the flood's signatures expire, its share is free again.
    later = NOW + 2 * WINDOW_S + 2 * replay.MARGIN_S + replay.PARTITION_S
    assert memory.remember("FLOOD", "salt-new-000", later, later, 5) is None


def test_a_salt_costs_far_less_than_64_bytes_at_many_salts() -> None:
    memory = ReplayMemory()
    n = 200_000
    for i in range(n):
        t = NOW + i * 0.004  # 250 per second, over several partitions
        assert memory.remember("K", f"{i:032x}", t, t, BIG) is None
    assert len(memory) == n
    assert memory.nbytes() / n <= 64


def test_a_partition_is_dropped_whole_once_it_cannot_verify(db_path: str) -> None:
    memory = ReplayMemory()
    memory.remember("K", "old-salt-0001", NOW, NOW, BIG)
    memory.remember("K", "new-salt-0001", NOW + 600, NOW + 600, BIG)
    assert len(memory) == 2
    memory.remember("K", "new-salt-0002", NOW + 600, NOW + 600 + WINDOW_S, BIG)
    assert len(memory) == 2  # the first partition went, its count with it


# --- the file shared by workers ----------------------------------------------------------------


def test_the_file_is_seen_by_another_connection_and_survives_a_reopen(db_path: str) -> None:
    first, second = FileMemory(db_path), FileMemory(db_path)
    assert first.remember("K", "salt-0001", NOW, NOW, BIG) is None
    assert second.remember("K", "salt-0001", NOW, NOW, BIG) == REUSED
    asyncio.run(first.file.close())
    assert FileMemory(db_path).remember("K", "salt-0001", NOW, NOW, BIG) == REUSED
    assert second.file.salts() == 1


def test_a_salt_takes_less_than_64_bytes_of_the_file(db_path: str) -> None:
    memory = FileMemory(db_path)

    async def fill() -> None:
        for i in range(50_000):
            t = NOW + i * 0.01
            assert await memory.file.remember("K", f"{i:032x}", t, t, BIG) is None

    asyncio.run(fill())
    asyncio.run(memory.file.close())  # checkpoints the log into the file
    assert os.path.getsize(db_path) / 50_000 <= 64


async def test_a_lock_held_by_another_worker_waits_without_blocking_the_loop(
    db_path: str,
) -> None:
    memory = StateFile(db_path, timeout_s=0.3)
    assert await memory.remember("K", "salt-0001", NOW, NOW, BIG) is None
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another worker, stuck mid-write
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    with pytest.raises(StateError, match="locked"):
        await memory.remember("K", "salt-0002", NOW, NOW, BIG)
    waited = time.monotonic() - started
    ticker.cancel()
    assert 0.3 <= waited < 5  # its own timeout, not SQLite's busy handler
    assert ticks >= 5  # the loop kept running all along
    holder.execute("ROLLBACK")
    assert await memory.remember("K", "salt-0002", NOW, NOW, BIG) is None  # recovered
    holder.close()


async def test_an_unusable_file_fails_the_check_until_it_is_usable(tmp_path: Path) -> None:
    folder = tmp_path / "missing"
    memory = StateFile(str(folder / "state.sqlite3"), timeout_s=0.5)
    with pytest.raises(StateError):
        await memory.remember("K", "salt-0001", NOW, NOW, BIG)
    folder.mkdir()
    assert await memory.remember("K", "salt-0001", NOW, NOW, BIG) is None


def test_no_module_of_the_gateway_sleeps_on_its_event_loop() -> None:
    """``time.sleep`` stalls every request of a worker: waits are ``await asyncio.sleep``."""
    package = Path(__file__).parent.parent / "gateway"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "sleep":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "time"), path


RACERS = 6
RACE_SALTS = 150


def race(path: str, barrier: Any, results: Any, index: int) -> None:
    """One worker: open the file when all start, then claim every salt in a shuffled order."""
    memory = StateFile(path, timeout_s=10.0)
    salts = [f"salt{k:06d}" for k in range(RACE_SALTS)]
    order = sorted(salts, key=lambda k: hash((k, index)))
    barrier.wait()

    async def claim() -> tuple[list[str], dict[str | None, int]]:
        won = [s for s in order if await memory.remember(HMAC_KEY, s, NOW, NOW, BIG) is None]
        refused = Counter(
            [await memory.remember(HMAC_KEY, s, NOW, NOW, BIG) for s in order if s not in won]
        )
        return won, dict(refused)

    won, refused = asyncio.run(claim())
    results.put((index, won, refused))


def test_processes_racing_for_the_same_salts_accept_each_exactly_once(db_path: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as workers are
    barrier = ctx.Barrier(RACERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=race, args=(db_path, barrier, results, i)) for i in range(RACERS)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    wins = Counter(salt for _, won, _ in outcomes for salt in won)
    assert len(wins) == RACE_SALTS and set(wins.values()) == {1}  # exactly one winner each
    assert all(set(refused) <= {REUSED} for _, _, refused in outcomes)
    assert StateFile(db_path, 1.0).salts() == RACE_SALTS


def sdk_header(salt: str | None = None) -> str:
    date = format_date(datetime.now(UTC))
    return authorization(HMAC_KEY, Secret(HMAC_SECRET), date, salt or new_salt())


# --- end to end: serve --workers 3 -------------------------------------------------------------

WORKERS = 3
SENDS = 12
BALANCE = "/cash/v1/balance"


def replay_policy(creds: Creds) -> str:
    return (
        "roles: [VIEWER, MEMBER, OWNER]\n"
        "principals:\n"
        + principal_yaml("test-viewer", "VIEWER", token=creds.tokens["VIEWER"])
        + principal_yaml("sdk-svc", "MEMBER", hmac_key=HMAC_KEY, hmac_secret=HMAC_SECRET)
        + "routes:\n"
        "  - name: cash-balance\n"
        "    method: GET\n"
        f"    path: {BALANCE}\n"
        "    min_role: VIEWER\n"
    )


@pytest.fixture
def workers_gateway(
    tmp_path: Path, creds: Creds, start_gateway: Callable[..., GatewayProc]
) -> tuple[GatewayProc, Path]:
    """``serve --workers 3`` with an internal key pair, its TMPDIR a folder of the test's."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    gateway = start_gateway(
        policy=replay_policy(creds), workers=WORKERS, env={"TMPDIR": str(scratch)}
    )
    return gateway, scratch


async def send_on_new_connections(gateway: GatewayProc, header: str, n: int) -> list[int]:
    """``n`` requests with the same Authorization, at once, each on its own connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            reply = await gateway.send(session, "GET", BALANCE, headers={"Authorization": header})
            return reply.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


def reasons(gateway: GatewayProc) -> list[str]:
    return [str(e.get("reason")) for e in gateway.access_lines() if e["status"] == 401]


@pytest.mark.e2e
async def test_a_replayed_sdk_header_is_accepted_once_by_all_workers_together(
    workers_gateway: tuple[GatewayProc, Path], sandbox: SandboxProc
) -> None:
    gateway, scratch = workers_gateway
    (state_dir,) = scratch.glob("solapi-gateway-state-*")
    header = sdk_header()

    before = sandbox.count()
    statuses = await send_on_new_connections(gateway, header, SENDS)
    assert sorted(statuses) == [200] + [401] * (SENDS - 1)
    assert sandbox.count() == before + 1  # forwarded exactly once
    assert (state_dir / "state.sqlite3").exists()
    await poll(lambda: len(reasons(gateway)) >= SENDS - 1)
    refused = reasons(gateway)
    assert len(refused) == SENDS - 1
    assert all(r.startswith("hmac reused (DuplicatedSignature)") for r in refused), refused

    # Every worker reloads (SIGHUP) and still remembers; a fresh header still passes.
    gateway.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gateway.events("reloaded")) == WORKERS)
    assert await send_on_new_connections(gateway, header, 6) == [401] * 6
    assert await send_on_new_connections(gateway, sdk_header(), 1) == [200]
    assert sandbox.count() == before + 2

    # A worker that dies is replaced by one that opens the same memory.
    first_worker = gateway.worker_pids()[0]
    os.kill(first_worker, signal.SIGKILL)
    await poll(lambda: len(gateway.worker_pids()) == WORKERS + 1)
    await poll(lambda: gateway.admin("/readyz")[0] == 200)
    assert await send_on_new_connections(gateway, header, 2 * WORKERS) == [401] * 2 * WORKERS
    assert sandbox.count() == before + 2

    assert gateway.proc.stop(signal.SIGTERM) == 0
    assert not state_dir.exists()  # the supervisor removed it
    assert list(scratch.iterdir()) == []  # and its metrics folder too
    assert gateway.events()  # every stderr line parses as JSON: no worker wrote a traceback
