"""A small SOLAPI look-alike upstream, for the demo and the end-to-end tests.

It verifies each API request's ``Authorization`` with the same ``Verifier`` the
gateway uses for internal callers (every SDK dialect, 15-minute skew, no reuse),
keeps records in memory with a 14-day trash, and remembers what it received so
tests can check what the gateway really sent upstream. ``solapi-gateway
sandbox`` runs it alone; ``solapi-gateway demo`` runs it beside a gateway.

    app.py          the HTTP app: signature checks, endpoints, ``run_sandbox``
    records.py      the records store and its seed (``demo_record_id``)
    requestlog.py   what was received, for ``GET /_sandbox/requests``

A test double: nothing on the gateway's request path imports it; only the
``sandbox`` and ``demo`` commands do.
"""

from gateway.sandbox.app import build_app, run_sandbox
from gateway.sandbox.records import (
    ACTIVE_COUNT,
    PURGED_COUNT,
    TRASHED_COUNT,
    RecordKind,
    demo_record_id,
)

__all__ = [
    "ACTIVE_COUNT",
    "PURGED_COUNT",
    "TRASHED_COUNT",
    "RecordKind",
    "build_app",
    "demo_record_id",
    "run_sandbox",
]
