"""The ``memory`` state of ``serve --workers N``: one SQLite file every worker opens.

The kernel spreads connections over the workers, so a replay memory or a rate
limit kept per worker would let a replayed header through once per worker and
a limit N times over. The supervisor makes this file in a folder of its own
(removed at exit) and names it on each worker's command line (gateway/state.py).

    seen_<g>(fp INTEGER PRIMARY KEY)     the fingerprints of partition g (gateway/replay.py)
    parts(g)                             which partitions exist
    counts(k, g, n)                      how many salts key k has in partition g
    buckets(b, tat)                      each rate-limit bucket's arrival time (gateway/limits.py)

Why it is correct and small:

- **Atomic.** Every check is one ``BEGIN IMMEDIATE`` transaction: SQLite lets
  one writer in at a time (a file lock the kernel drops if a worker dies
  holding it), so two workers given the same salt, or racing for the last
  unit of a bucket, are served one after the other. A request's rate limits
  are read, decided and written in one transaction: all or nothing.
- **Never a blocking wait.** ``busy_timeout`` is 0: a worker that finds the
  lock taken (held for tens of microseconds) gets ``SQLITE_BUSY`` at once and
  tries again after ``await asyncio.sleep``, so its other requests go on; past
  ``state.timeout_s`` the check fails (503 for HMAC callers, ``on_error`` for limits).
- **Compact.** A remembered salt is one 8-byte integer key of a rowid table:
  about 20 bytes on disk. A partition past the horizon is dropped whole, its
  pages reused by the next, so the file holds only what could still verify.
- **Cheap to lose.** ``synchronous=OFF``: the file lives only as long as the
  supervisor, and nothing is read back after a machine crash.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from typing import Any, Final

from gateway import replay
from gateway.limits import Charge, Verdict, decide

_WAL_LIMIT_BYTES: Final = 8 << 20
_PURGE_BUCKETS_EVERY: Final = 1024
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS parts (g INTEGER PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS counts (k TEXT NOT NULL, g INTEGER NOT NULL, n INTEGER NOT NULL,"
    " PRIMARY KEY (k, g)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS buckets (b TEXT PRIMARY KEY, tat REAL NOT NULL) WITHOUT ROWID",
)
_COUNT: Final = "SELECT coalesce(sum(n), 0) FROM counts WHERE k = ? AND g >= ?"
_ADD_COUNT: Final = (
    "INSERT INTO counts (k, g, n) VALUES (?, ?, 1) ON CONFLICT (k, g) DO UPDATE SET n = n + 1"
)
_SET_TAT: Final = (
    "INSERT INTO buckets (b, tat) VALUES (?, ?) ON CONFLICT (b) DO UPDATE SET tat = excluded.tat"
)


class StateError(Exception):
    """The shared state could not answer: the caller decides what that means."""


class StateFile:
    """The replay memory and the rate-limit buckets over one file that workers share.

    The connection is opened on first use, in the process that uses it (never
    carried over a fork); if it cannot be opened, the check fails and the next
    one tries again."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._inherited: list[sqlite3.Connection] = []
        self._parts: set[int] = set()  # partitions this connection knows exist
        self._ready = False  # the tables exist
        self._swept_at = -1
        self._until_purge = _PURGE_BUCKETS_EVERY

    async def remember(
        self, api_key: str, salt: str, signed_at: float, now: float, limit: int
    ) -> str | None:
        fp, g = replay.fingerprint(api_key, salt), replay.partition(signed_at)
        result: str | None = await self._transaction(self._remember, api_key, fp, g, now, limit)
        return result

    async def consume(self, charges: list[Charge]) -> Verdict:
        verdict: Verdict = await self._transaction(self._consume, charges)
        return verdict

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def salts(self) -> int:
        """How many salts are remembered (for tests and the benchmark)."""
        db = self._connection()
        parts = [g for (g,) in db.execute("SELECT g FROM parts")]
        return sum(db.execute(f"SELECT count(*) FROM seen_{g}").fetchone()[0] for g in parts)

    async def _transaction(self, body: Any, *args: Any) -> Any:
        """``body(db, *args)`` inside BEGIN IMMEDIATE ... COMMIT, tried again (after
        an await, never a sleep) while another worker holds the lock."""
        deadline = time.monotonic() + self.timeout_s
        delay = 50e-6
        while True:
            try:
                db = self._connection()
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise StateError(f"state file: {exc}") from None
                if time.monotonic() >= deadline:
                    raise StateError("state file: locked by another worker for too long") from None
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(2 * delay, 1e-3)
                continue
            except sqlite3.Error as exc:
                raise StateError(f"state file: {exc}") from None
            try:
                if not self._ready:  # several workers may create the tables at once
                    for statement in _SCHEMA:
                        db.execute(statement)
                    self._ready = True
                result = body(db, *args)
                db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StateError(f"state file: {exc}") from None

    def _remember(
        self, db: sqlite3.Connection, api_key: str, fp: int, g: int, now: float, limit: int
    ) -> str | None:
        first = replay.oldest_live(now)
        if int(now) != self._swept_at:
            self._sweep(db, first)
            self._swept_at = int(now)
        (count,) = db.execute(_COUNT, (api_key, first)).fetchone()
        if count >= limit:
            if g in self._parts or self._exists(db, g):
                found = db.execute(f"SELECT 1 FROM seen_{g} WHERE fp = ?", (fp,)).fetchone()
                if found is not None:
                    return replay.REUSED
            return replay.FULL
        if g not in self._parts:
            db.execute(f"CREATE TABLE IF NOT EXISTS seen_{g} (fp INTEGER PRIMARY KEY)")
            db.execute("INSERT OR IGNORE INTO parts (g) VALUES (?)", (g,))
            self._parts.add(g)
        if db.execute(f"INSERT OR IGNORE INTO seen_{g} (fp) VALUES (?)", (fp,)).rowcount != 1:
            return replay.REUSED
        db.execute(_ADD_COUNT, (api_key, g))
        return None

    def _exists(self, db: sqlite3.Connection, g: int) -> bool:
        return db.execute("SELECT 1 FROM parts WHERE g = ?", (g,)).fetchone() is not None

    def _sweep(self, db: sqlite3.Connection, first: int) -> None:
        dead = [g for (g,) in db.execute("SELECT g FROM parts WHERE g < ?", (first,))]
        for g in dead:
            db.execute(f"DROP TABLE IF EXISTS seen_{g}")
            self._parts.discard(g)
        if dead:
            db.execute("DELETE FROM parts WHERE g < ?", (first,))
            db.execute("DELETE FROM counts WHERE g < ?", (first,))

    def _consume(self, db: sqlite3.Connection, charges: list[Charge]) -> Verdict:
        now = time.monotonic()  # one clock for every process of this machine
        buckets = [c.bucket for c in charges]
        marks = ",".join("?" * len(buckets))
        stored = dict(db.execute(f"SELECT b, tat FROM buckets WHERE b IN ({marks})", buckets))
        verdict = decide(charges, [stored.get(b) for b in buckets], now)
        if verdict.allowed:
            db.executemany(_SET_TAT, zip(buckets, verdict.tats, strict=True))
            self._until_purge -= 1
            if self._until_purge <= 0:  # a full bucket is the same as none: forget it
                self._until_purge = _PURGE_BUCKETS_EVERY
                db.execute("DELETE FROM buckets WHERE tat < ?", (now,))
        return verdict

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None:
            if self._pid == os.getpid():
                return self._db
            # Forked after use: SQLite connections must not cross a fork, and closing
            # this one here could act on the shared file under the parent: only keep it.
            self._inherited.append(self._db)
            self._db = None
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 0")  # _transaction waits, without blocking
            # Without WAL a worker killed in the middle of a write could corrupt the file.
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            db.execute("PRAGMA synchronous = OFF")
            # A burst can outrun checkpointing; once it has caught up, give the space back.
            db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
        except sqlite3.Error:
            db.close()
            raise
        self._db, self._pid = db, os.getpid()
        self._parts, self._ready = set(), False
        return db


def _busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
