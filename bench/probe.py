"""``solapi-gateway`` with a probe: every garbage collection timed, parts switchable off.

    python bench/probe.py OUT.json [--without PART,...] serve --config gateway.yaml

It runs the gateway's own command line in this process, after installing a
``gc.callbacks`` hook that times each collection (by generation) and, for each
PART named, a patch that switches it off:

    gc-freeze    start-up objects stay in the collector's view (no gc.freeze())
    access-log   no access line is built or written
    metrics      no metric is recorded

When the gateway exits (SIGTERM), OUT.json receives the collections counted and
timed since it started listening. bench/tail.py compares the variants: what
each part costs at the tail is the difference it makes there.
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
import time
from typing import Any

PARTS = ("gc-freeze", "access-log", "metrics")


class GcTimer:
    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0
        self.counting = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.counting:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1e3)

    def summary(self) -> dict[str, Any]:
        every = sorted(p for pauses in self.pauses.values() for p in pauses)
        return {
            "collections": {str(g): len(p) for g, p in self.pauses.items()},
            "total_ms": round(sum(every), 3),
            "max_ms": round(every[-1], 3) if every else 0.0,
            "gen2_max_ms": round(max(self.pauses[2], default=0.0), 3),
        }


def switch_off(parts: set[str], timer: GcTimer) -> None:
    from gateway import logs, metrics, server, service

    def listening() -> None:
        if "gc-freeze" not in parts:
            real_settle()
        timer.counting = True  # from here on: serving, not starting

    real_settle = server.settle_after_start
    service.settle_after_start = listening  # type: ignore[attr-defined]
    if "access-log" in parts:
        logs.access = lambda line: None  # type: ignore[assignment]
    if "metrics" in parts:
        for name in ("request", "rejected", "batch", "upstream", "entered", "left"):
            setattr(metrics.Metrics, name, lambda self, *args, **kwargs: None)


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    parts: set[str] = set()
    if rest[:1] == ["--without"]:
        parts = {p for p in rest[1].split(",") if p}
        rest = rest[2:]
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"probe: unknown parts {sorted(unknown)}; known: {PARTS}")
    timer = GcTimer()
    gc.callbacks.append(timer)
    switch_off(parts, timer)

    def write() -> None:
        with open(out, "w") as f:
            json.dump({"without": sorted(parts), **timer.summary()}, f)

    atexit.register(write)
    from gateway import cli

    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
