"""What ``GET /status`` on the admin port says: which config runs, and how the last reload went.

    {"version": "0.2.0",
     "pid": 4242,                              the process serving the admin port
     "config_sha256": "…", "policy_sha256": "…",   of the files the running set was read from
     "loaded_at": "2026-11-30T09:00:00.000Z",  when that set was loaded (start, or a reload)
     "last_reload": {"result": "failure", "at": "…", "error": ["FILE:LINE: key: message"]},
     "workers": {"configured": 2, "ready": 2, "pids": [4243, 4244]}}

``last_reload`` is null until the first reload (by SIGHUP, or by
``reload_on_change``). A failed reload leaves the old set running: the hashes
and ``loaded_at`` stay those of the old set, ``last_reload`` says why the new
one was refused, and ``/readyz`` stays 200, since the gateway is still serving
correctly with the set it has (a reload is no reason to take traffic away).

No value of the config appears here, only hashes of the files' bytes: a file
may hold a secret (a password in a URL, a key), and the admin port may be
scraped by more people than may read it. The problems of a refused reload are
the loader's own lines, which name keys, never values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gateway import __version__, logs
from gateway.config import Settings


@dataclass(frozen=True, slots=True)
class Workers:
    configured: int
    ready: int
    pids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reload:
    result: str  # "success" | "failure"
    at: str
    error: tuple[str, ...] | None


class Status:
    """The running set's fingerprint and the last reload, kept by whoever reloads."""

    def __init__(self, settings: Settings) -> None:
        self.config_sha256 = settings.config_sha256
        self.policy_sha256 = settings.policy.sha256
        self.loaded_at = logs.now_iso()
        self.last_reload: Reload | None = None

    def reloaded(self, settings: Settings) -> None:
        self.config_sha256 = settings.config_sha256
        self.policy_sha256 = settings.policy.sha256
        self.loaded_at = logs.now_iso()
        self.last_reload = Reload("success", self.loaded_at, None)

    def refused(self, errors: list[str]) -> None:
        self.last_reload = Reload("failure", logs.now_iso(), tuple(errors))

    def page(self, workers: Workers) -> dict[str, Any]:
        last = self.last_reload
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config_sha256": self.config_sha256,
            "policy_sha256": self.policy_sha256,
            "loaded_at": self.loaded_at,
            "last_reload": None
            if last is None
            else {"result": last.result, "at": last.at, "error": list(last.error or ()) or None},
            "workers": {
                "configured": workers.configured,
                "ready": workers.ready,
                "pids": list(workers.pids),
            },
        }
