"""The replay memory: the internal HMAC signatures already accepted, bounded per key.

A signature is accepted only within ``WINDOW_S`` of its date, so a header
replayed later is refused as skewed anyway: the memory keeps each one only
until ``date + WINDOW_S + MARGIN_S`` (the margin covers replicas whose clocks
disagree a little). What is remembered is a 64-bit fingerprint of the key
and the salt; a collision could only make a new salt look reused (about one
in 10^13 at a million salts).

Bounded per key: every internal key of the policy gets an equal share of
``state.replay_salts``. A key that has used its share is refused (401,
``replay memory full for this key``) until its oldest entries expire; other
keys are not affected, so no caller can lock out another by flooding.

Compact: fingerprints are kept in partitions of ``PARTITION_S`` seconds of
signature dates, each an open-addressing hash table in one ``array('Q')``
(8 bytes a slot, at most half full, so 16-32 bytes per salt and nothing per
salt besides). A replayed header carries the same date, so one lookup in one
partition finds it; a partition whose last date is past the horizon is
dropped whole, so expiry costs nothing per salt. The same partitions are the
tables of the file shared by workers (gateway/statefile.py) and the hash
fields of the Redis backend's per-key counts (gateway/stateredis.py).

``ReplayMemory`` is the in-process one: a lone ``serve``'s, the sandbox
keeps its own ``signing.ReplayCache``.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Final

from gateway.signing import WINDOW_S

MARGIN_S: Final = 30  # replicas' clocks may disagree this much
PARTITION_S: Final = 60
REUSED: Final = "salt already used within the window"
FULL: Final = "replay memory full for this key"
_MIN_SLOTS: Final = 1024


def fingerprint(api_key: str, salt: str) -> int:
    """A 63-bit fingerprint of (key, salt), never 0 (an empty slot); 63 bits so
    that SQLite can keep it as an integer primary key."""
    digest = hashlib.blake2b(f"{api_key}:{salt}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def partition(signed_at: float) -> int:
    return int(signed_at // PARTITION_S)


def oldest_live(now: float) -> int:
    """The first partition some of whose signatures could still verify at ``now``."""
    return partition(now - WINDOW_S - MARGIN_S)


def share(total: int, keys: int) -> int:
    """Each internal key's share of ``total`` remembered salts."""
    return max(1, total // max(1, keys))


class _Table:
    """A set of fingerprints: linear probing over one array, at most half full."""

    __slots__ = ("mask", "per_key", "slots", "used")

    def __init__(self, capacity: int) -> None:
        self.slots = array("Q", [0]) * capacity
        self.mask = capacity - 1
        self.used = 0
        self.per_key: dict[str, int] = {}

    def _probe(self, fp: int) -> int:
        """The slot holding ``fp``, or the empty slot where it would go."""
        slots, mask = self.slots, self.mask
        i = fp & mask
        while (value := slots[i]) != fp and value != 0:
            i = (i + 1) & mask
        return i

    def __contains__(self, fp: int) -> bool:
        return self.slots[self._probe(fp)] == fp

    def add(self, fp: int, api_key: str) -> bool:
        """Add ``fp``; False if it was there already."""
        slots = self.slots
        i = self._probe(fp)
        if slots[i] == fp:
            return False
        slots[i] = fp
        self.used += 1
        self.per_key[api_key] = self.per_key.get(api_key, 0) + 1
        if 2 * self.used > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self.slots
        self.slots = slots = array("Q", [0]) * (2 * len(old))
        self.mask = mask = len(slots) - 1
        for fp in old:
            if fp:
                i = fp & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = fp


class ReplayMemory:
    """The replay memory of one process (see the module's docstring)."""

    def __init__(self) -> None:
        self._partitions: dict[int, _Table] = {}
        self._per_key: dict[str, int] = {}  # live salts per key, over every partition
        self._swept_at = -1

    def __len__(self) -> int:
        return sum(table.used for table in self._partitions.values())

    def nbytes(self) -> int:
        """The bytes its tables take (what ``state.replay_salts`` bounds)."""
        return sum(t.slots.itemsize * len(t.slots) for t in self._partitions.values())

    def remember(
        self, api_key: str, salt: str, signed_at: float, now: float, limit: int
    ) -> str | None:
        """Record the signature; return why it must be refused, or None if it is new.

        ``limit`` is the key's share: how many salts it may have remembered at once."""
        if int(now) != self._swept_at:
            self._sweep(now)
        fp = fingerprint(api_key, salt)
        g = partition(signed_at)
        table = self._partitions.get(g)
        if self._per_key.get(api_key, 0) >= limit:
            return REUSED if table is not None and fp in table else FULL
        if table is None:
            table = self._partitions[g] = _Table(self._capacity_for(g))
        if not table.add(fp, api_key):
            return REUSED
        self._per_key[api_key] = self._per_key.get(api_key, 0) + 1
        return None

    def _capacity_for(self, g: int) -> int:
        # As large as the partition before it ended up, so steady traffic never
        # makes a table grow (a growth copies it, which is the one slow step).
        before = self._partitions.get(g - 1)
        want = 2 * before.used + 2 if before is not None else 0
        capacity = _MIN_SLOTS
        while capacity < want:
            capacity *= 2
        return capacity

    def _sweep(self, now: float) -> None:
        self._swept_at = int(now)
        first = oldest_live(now)
        for g in [g for g in self._partitions if g < first]:
            for api_key, n in self._partitions.pop(g).per_key.items():
                left = self._per_key[api_key] - n
                if left:
                    self._per_key[api_key] = left
                else:
                    del self._per_key[api_key]

    def close(self) -> None:
        self._partitions.clear()
        self._per_key.clear()
