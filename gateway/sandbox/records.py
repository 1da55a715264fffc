"""The sandbox's records: each active, in the 14-day trash, or purged for good.

Seed records, relative to the clock at ``RecordStore.seeded``:
``demo_record_id("TRASH", n)`` for n in 1..1500, deleted 1 hour (n=1) to 13
days (n=1500) ago; ``"PURGE"`` 1..20, deleted 15-34 days ago; ``"ALIVE"``
1..20, never deleted. Every operation takes ``now``: purging is judged against
the caller's clock, so a test that moves a fake clock past the retention sees
the oldest records go without any timer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

RETENTION_S: Final = 14 * 24 * 3600
ID_PREFIX: Final = "CRMRC2026112800000000"  # "CRMRC" and 16 digits; 11 characters follow
TRASHED_COUNT: Final = 1500
PURGED_COUNT: Final = 20
ACTIVE_COUNT: Final = 20

RecordKind = Literal["TRASH", "PURGE", "ALIVE"]
_KINDS: Final = ("TRASH", "PURGE", "ALIVE")
_HOUR: Final = 3600.0
_DAY: Final = 24 * _HOUR


def demo_record_id(kind: RecordKind, n: int) -> str:
    """The id of seed record ``n`` of a kind, e.g. ``CRMRC2026112800000000TRASH000001``."""
    if kind not in _KINDS or not 1 <= n <= 999_999:
        raise ValueError(f"no demo record {kind!r} {n}")
    return f"{ID_PREFIX}{kind}{n:06d}"


@dataclass(slots=True)
class Record:
    record_id: str
    deleted_at: float | None = None  # None: active; -inf: deleted permanently

    def state(self, now: float) -> Literal["active", "trash", "purged"]:
        if self.deleted_at is None:
            return "active"
        # Purging is judged lazily against the clock, so a test that moves its
        # fake clock past the retention sees the record GC'd without any timer.
        return "trash" if now - self.deleted_at <= RETENTION_S else "purged"


class RecordStore:
    """Records by id. Every operation takes ``now``; nothing here reads a clock."""

    def __init__(self, records: Iterable[Record]) -> None:
        self._records = {record.record_id: record for record in records}

    @classmethod
    def seeded(cls, start: float) -> RecordStore:
        records: list[Record] = []
        span = 13 * _DAY - _HOUR
        for n in range(1, TRASHED_COUNT + 1):
            # Spread evenly so that moving the clock ahead purges the oldest first.
            age = _HOUR + span * (n - 1) / (TRASHED_COUNT - 1)
            records.append(Record(demo_record_id("TRASH", n), start - age))
        for n in range(1, PURGED_COUNT + 1):
            records.append(Record(demo_record_id("PURGE", n), start - (14 + n) * _DAY))
        for n in range(1, ACTIVE_COUNT + 1):
            records.append(Record(demo_record_id("ALIVE", n)))
        return cls(records)

    def restore(self, record_id: str, now: float) -> str:
        record = self._records.get(record_id)
        if record is None:
            return "notFound"
        state = record.state(now)
        if state == "active":
            return "notDeleted"
        if state == "purged":
            return "purged"
        record.deleted_at = None
        return "restored"

    def delete(self, record_id: str, now: float, *, permanent: bool) -> str:
        record = self._records.get(record_id)
        if record is None:
            return "notFound"
        state = record.state(now)
        if state == "purged":
            return "alreadyDeleted"
        if permanent:
            record.deleted_at = float("-inf")
            return "purged"
        if state == "trash":
            return "alreadyDeleted"
        record.deleted_at = now
        return "deleted"

    def trash(self, now: float) -> list[tuple[str, float]]:
        """Restorable records as (id, deleted_at), most recently deleted first."""
        found = [
            (record.record_id, record.deleted_at)
            for record in self._records.values()
            if record.deleted_at is not None and record.state(now) == "trash"
        ]
        found.sort(key=lambda item: (-item[1], item[0]))
        return found
