"""The replay memory shared by the workers of ``serve --workers N`` (gateway/replay.py).

It must behave exactly like the in-memory ``ReplayCache`` (same answers for the
same sequence), be atomic across real processes racing for the same salt,
expire, stay bounded and refuse when full or broken, survive a reopen and a
reload, and, end to end, let a replayed SDK header through once in all, not
once per worker.
"""

from __future__ import annotations

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
from multidict import CIMultiDict
from support import Creds, GatewayProc, SandboxProc, poll, principal_yaml

from gateway import replay
from gateway.errors import Unauthorized
from gateway.identity import identify, verifier_for
from gateway.policy import Policy
from gateway.principals import Principal
from gateway.replay import SharedReplayCache
from gateway.signing import (
    REPLAY_FULL,
    REPLAY_REUSED,
    Rejected,
    ReplayCache,
    ReplayMemory,
    Secret,
    Verifier,
    authorization,
    format_date,
    new_salt,
)

HMAC_KEY = "NCSINTREPLAY0001"
HMAC_SECRET = "replay-test-secret-0123456789"


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "replay.sqlite3")


def shared(path: str, **options: Any) -> SharedReplayCache:
    return SharedReplayCache(path, **options)


# --- the same answers as the in-memory cache -------------------------------------------------


@pytest.mark.parametrize("kind", ["in-memory", "shared"])
def test_both_memories_answer_the_same_sequence_the_same(kind: str, db_path: str) -> None:
    cache: ReplayMemory = (
        ReplayCache(window_s=900, max_entries=3)
        if kind == "in-memory"
        else shared(db_path, window_s=900, max_entries=3)
    )
    assert cache.check_and_add("a", 0) is None
    assert cache.check_and_add("a", 10) == REPLAY_REUSED
    assert cache.check_and_add("b", 10) is None
    assert cache.check_and_add("c", 10) is None
    assert cache.check_and_add("d", 10) == REPLAY_FULL  # fails closed
    assert cache.check_and_add("d", 1801) is None  # "a" has expired after 2 windows
    assert cache.check_and_add("a", 1805) == REPLAY_FULL  # b, c, d still live
    assert cache.check_and_add("a", 1811) is None  # b and c have expired too
    assert cache.check_and_add("d", 1900) == REPLAY_REUSED
    assert cache.check_and_add("e", 5000) is None


def test_an_entry_lives_exactly_two_windows_after_it_was_first_seen(db_path: str) -> None:
    cache = shared(db_path, window_s=900)
    assert cache.check_and_add("k", 100.0) is None
    assert cache.check_and_add("k", 100.0 + 1799.999) == REPLAY_REUSED
    # A refused replay does not extend the entry's life.
    assert cache.check_and_add("k", 100.0 + 1800) is None
    assert cache.check_and_add("k", 100.0 + 1800.5) == REPLAY_REUSED
    assert len(cache) == 1  # taken over in place, not a second row


def test_expired_entries_are_deleted_as_new_ones_come(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay, "_PURGE_EVERY", 10)
    cache = shared(db_path, window_s=1)
    for i in range(100):  # one a second: every entry expires 2 s after it came
        assert cache.check_and_add(f"k{i}", float(i)) is None
    assert len(cache) <= 2 + 10  # the live ones, plus at most one purge interval's worth


def test_a_full_memory_makes_room_only_from_expired_entries(db_path: str) -> None:
    cache = shared(db_path, window_s=10, max_entries=50)
    for i in range(50):
        assert cache.check_and_add(f"k{i}", 0.0) is None
    assert cache.check_and_add("late", 19.9) == REPLAY_FULL
    assert len(cache) == 50
    assert cache.check_and_add("late", 20.0) is None  # all 50 expired at 20
    assert len(cache) == 1


def test_the_memory_survives_a_reopen_and_is_seen_by_another_connection(db_path: str) -> None:
    first = shared(db_path)
    assert first.check_and_add("k", 1000.0) is None
    other = shared(db_path)  # another worker
    assert other.check_and_add("k", 1001.0) == REPLAY_REUSED
    first.close()
    again = shared(db_path)
    assert again.check_and_add("k", 1002.0) == REPLAY_REUSED
    assert len(again) == 1


def test_an_unusable_file_refuses_every_check_until_it_is_usable(tmp_path: Path) -> None:
    folder = tmp_path / "not-yet"
    cache = shared(str(folder / "replay.sqlite3"))
    reason = cache.check_and_add("k", 0.0)
    assert reason is not None and reason.startswith("replay memory unavailable: ")
    folder.mkdir()
    assert cache.check_and_add("k", 0.0) is None
    assert cache.check_and_add("k", 1.0) == REPLAY_REUSED


def test_a_lock_held_too_long_is_a_refusal_not_an_acceptance(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay, "BUSY_TIMEOUT_S", 0.2)
    cache = shared(db_path)
    assert cache.check_and_add("warm", 0.0) is None
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process sitting on the write lock
    try:
        started = time.monotonic()
        reason = cache.check_and_add("k", 1.0)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert reason == "replay memory unavailable: database is locked"
    assert 0.2 <= waited < 1.0
    assert cache.check_and_add("k", 2.0) is None  # nothing was recorded by the refusal


def test_a_corrupt_file_is_a_refusal(db_path: str) -> None:
    Path(db_path).write_bytes(b"not a database, " * 512)
    reason = shared(db_path).check_and_add("k", 0.0)
    assert reason is not None and reason.startswith("replay memory unavailable: ")


# --- atomic across processes -----------------------------------------------------------------

RACERS = 6
RACE_KEYS = 150


def race(path: str, barrier: Any, results: Any, index: int) -> None:
    """One worker: open the file when all start, then claim every key in a shuffled order."""
    cache = SharedReplayCache(path)
    keys = [f"{HMAC_KEY}:salt{k:06d}" for k in range(RACE_KEYS)]
    order = sorted(keys, key=lambda k: hash((k, index)))
    barrier.wait()
    won = [key for key in order if cache.check_and_add(key, 1000.0) is None]
    refused = Counter(cache.check_and_add(key, 1000.0) for key in order if key not in won)
    results.put((index, won, dict(refused)))


def test_processes_racing_for_the_same_salts_accept_each_exactly_once(db_path: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as workers are
    barrier = ctx.Barrier(RACERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=race, args=(db_path, barrier, results, i)) for i in range(RACERS)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    wins = Counter(key for _, won, _ in outcomes for key in won)
    assert len(wins) == RACE_KEYS and set(wins.values()) == {1}  # exactly one winner each
    assert all(set(refused) <= {REPLAY_REUSED} for _, _, refused in outcomes)
    assert len(shared(db_path)) == RACE_KEYS


# --- the verifier and reloads ----------------------------------------------------------------


def sdk_header(salt: str | None = None) -> str:
    date = format_date(datetime.now(UTC))
    return authorization(HMAC_KEY, Secret(HMAC_SECRET), date, salt or new_salt())


def policy() -> Policy:
    sdk = Principal(
        name="sdk-svc", role="MEMBER", hmac_key=HMAC_KEY, hmac_secret=Secret(HMAC_SECRET)
    )
    return Policy(roles=("VIEWER", "MEMBER", "OWNER"), principals=(sdk,), routes=())


def test_two_workers_verifiers_share_one_memory_and_keep_it_across_reloads(db_path: str) -> None:
    rules = policy()
    # Each worker opens the one file its supervisor named (gateway/state.py).
    worker_a = verifier_for(rules, SharedReplayCache(db_path))
    worker_b = verifier_for(rules, SharedReplayCache(db_path))
    header = CIMultiDict({"Authorization": sdk_header()})
    identify(header, None, rules, worker_a, time.time())
    assert "hmac reused (DuplicatedSignature)" in refusal(header, rules, worker_b)
    reloaded = verifier_for(rules, worker_b.replay)  # SIGHUP in worker b
    assert reloaded.replay is worker_b.replay
    assert "hmac reused (DuplicatedSignature)" in refusal(header, rules, reloaded)


def refusal(headers: CIMultiDict[str], rules: Policy, verifier: Verifier) -> str:
    with pytest.raises(Unauthorized) as err:
        identify(headers, None, rules, verifier, time.time())
    return err.value.reason or ""


def test_an_invalid_signature_is_never_recorded(db_path: str) -> None:
    memory = shared(db_path)
    good = Verifier({HMAC_KEY: Secret(HMAC_SECRET)}, replay=memory)
    forged = Verifier({HMAC_KEY: Secret("another-secret-entirely")}, replay=memory)
    header = sdk_header()
    with pytest.raises(Rejected, match="signature does not match"):
        forged.verify(header, time.time())
    assert len(memory) == 0
    good.verify(header, time.time())
    assert len(memory) == 1


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
    (replay_dir,) = scratch.glob("solapi-gateway-replay-*")
    header = sdk_header()

    before = sandbox.count()
    statuses = await send_on_new_connections(gateway, header, SENDS)
    assert sorted(statuses) == [200] + [401] * (SENDS - 1)
    assert sandbox.count() == before + 1  # forwarded exactly once
    assert (replay_dir / "replay.sqlite3").exists()
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
    assert not replay_dir.exists()  # the supervisor removed it
    assert list(scratch.iterdir()) == []  # and its metrics folder too
    assert gateway.events()  # every stderr line parses as JSON: no worker wrote a traceback
