"""The replay memory shared by the workers of one ``serve --workers N``.

Each worker verifies internal callers' HMAC headers on its own, and the kernel
spreads connections over the workers, so a memory per worker would let a
replayed header through once per worker. This one is a SQLite file in WAL mode
in a folder the supervisor makes (and removes at exit); every worker opens it,
and the supervisor names it on each worker's command line (gateway/state.py).

    seen(digest BLOB PRIMARY KEY, expiry REAL)   one row per (apiKey, salt) seen
    size(n)                                      the row count, kept by triggers

Why it is correct:

- **Atomic.** Check and record are one statement, an insert that yields to a
  live row with the same digest. SQLite runs writers one at a time (a file lock
  the kernel drops if a worker dies holding it), so of two workers given the
  same salt at once exactly one inserts; the other sees a conflict: a replay.
- **Same lifetime as ``ReplayCache``.** An entry lives ``2 * window_s`` after it
  was first seen: after that its signature cannot verify anyway. A dead entry
  is taken over in place by the same insert, so expiry never needs to have run.
- **Bounded, fails closed.** The insert happens only while ``size.n`` is below
  ``max_entries``; when it is not, expired rows are deleted and the insert is
  tried once more, else the answer is "replay memory full". Any SQLite error
  (disk full, a lock held past the busy timeout, a missing folder) is a refusal
  too, never an acceptance.
- **Cheap upkeep.** Expired rows are deleted oldest first (an index on expiry),
  at most ``_PURGE_ROWS`` at a time, every ``_PURGE_EVERY`` insertions of each
  worker: a worker never stalls on a long delete, and together the workers
  delete faster than they insert. Keys are stored as 16-byte digests, so a row
  is the same size whatever key and salt the caller chose (about 70 bytes on
  disk); a digest collision could only make a new salt look reused.
- **Short waits.** A check runs on the worker's event loop and takes about
  30 µs. A worker that finds the write lock taken tries again after tens of
  microseconds (``_execute``), and after ``BUSY_TIMEOUT_S`` refuses.

``synchronous=OFF`` is safe here: the file lives only as long as the supervisor
and nothing is read back after a machine crash; a worker that dies loses
nothing, its writes are already in the operating system's cache.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time
from typing import Any, Final

from gateway.signing import REPLAY_FULL, REPLAY_REUSED, WINDOW_S

BUSY_TIMEOUT_S: Final = 1.0
_PURGE_EVERY: Final = 64
_PURGE_ROWS: Final = 4 * _PURGE_EVERY
_WAL_LIMIT_BYTES: Final = 8 << 20

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, expiry REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_by_expiry ON seen (expiry)",
    "CREATE TABLE IF NOT EXISTS size (n INTEGER NOT NULL)",
    "INSERT INTO size SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM size)",
    "CREATE TRIGGER IF NOT EXISTS seen_added AFTER INSERT ON seen"
    " BEGIN UPDATE size SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS seen_removed AFTER DELETE ON seen"
    " BEGIN UPDATE size SET n = n - 1; END",
)
# New digest, or one whose entry has expired: recorded. A live one: nothing changes.
_ADD: Final = """
INSERT INTO seen (digest, expiry) SELECT :digest, :expiry WHERE (SELECT n FROM size) < :max
ON CONFLICT (digest) DO UPDATE SET expiry = excluded.expiry WHERE seen.expiry <= :now
"""
_LIVE: Final = "SELECT 1 FROM seen WHERE digest = ? AND expiry > ?"
_PURGE: Final = """
DELETE FROM seen WHERE digest IN
    (SELECT digest FROM seen WHERE expiry <= ? ORDER BY expiry LIMIT ?)
"""


def digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


class SharedReplayCache:
    """``ReplayCache``'s contract over a SQLite file that several processes share.

    The connection is opened on first use, in the process that uses it (never
    carried over a fork); if it cannot be opened, every check is refused and
    the next one tries again.
    """

    def __init__(self, path: str, window_s: float = WINDOW_S, max_entries: int = 1_000_000) -> None:
        self.path = path
        self._horizon = 2 * window_s
        self._max = max_entries
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._inherited: list[sqlite3.Connection] = []
        self._until_purge = _PURGE_EVERY

    def __len__(self) -> int:
        row = _execute(self._connection(), "SELECT n FROM size", ()).fetchone()
        return int(row[0])

    def check_and_add(self, key: str, now: float) -> str | None:
        """Record ``key``; return why it must be refused, or None if it is new."""
        try:
            return self._check_and_add(digest(key), now)
        except sqlite3.Error as exc:
            return f"replay memory unavailable: {exc}"

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _check_and_add(self, key: bytes, now: float) -> str | None:
        db = self._connection()
        if self._add(db, key, now):
            self._until_purge -= 1
            if self._until_purge <= 0:
                self._until_purge = _PURGE_EVERY
                self._purge(db, now)
            return None
        if self._live(db, key, now):
            return REPLAY_REUSED
        # Full (or the row expired just now): make room from the oldest and try once more.
        self._purge(db, now)
        if self._add(db, key, now):
            return None
        return REPLAY_REUSED if self._live(db, key, now) else REPLAY_FULL

    def _add(self, db: sqlite3.Connection, key: bytes, now: float) -> bool:
        params = {"digest": key, "expiry": now + self._horizon, "max": self._max, "now": now}
        return _execute(db, _ADD, params).rowcount == 1

    @staticmethod
    def _live(db: sqlite3.Connection, key: bytes, now: float) -> bool:
        return _execute(db, _LIVE, (key, now)).fetchone() is not None

    @staticmethod
    def _purge(db: sqlite3.Connection, now: float) -> None:
        _execute(db, _PURGE, (now, _PURGE_ROWS))

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None:
            if self._pid == os.getpid():
                return self._db
            # Forked after use: SQLite connections must not cross a fork, and closing
            # this one here could act on the shared file under the parent: only keep it.
            self._inherited.append(self._db)
            self._db = None
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            # Without WAL a worker killed in the middle of a write could corrupt the file.
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            db.execute("PRAGMA synchronous = OFF")
            # A burst can outrun checkpointing; once it has caught up, give the space back.
            db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
            db.execute("BEGIN IMMEDIATE")  # several workers may create the file at once
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("COMMIT")
            db.execute("PRAGMA busy_timeout = 0")  # from now on _execute waits, more finely
        except sqlite3.Error:
            db.close()
            raise
        self._db, self._pid = db, os.getpid()
        return db


def _execute(db: sqlite3.Connection, sql: str, params: Any) -> sqlite3.Cursor:
    """One statement, tried again while another worker holds the write lock.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, so a
    worker that loses a few times in a row waits far longer than the lock is
    ever held (tens of microseconds). Every statement here is a transaction of
    its own that either happened or did not, so running it again is safe.
    """
    delay, deadline = 50e-6, None
    while True:
        try:
            return db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + BUSY_TIMEOUT_S
            elif now >= deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(2 * delay, 1e-3)
