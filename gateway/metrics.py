"""Prometheus metrics, exactly the names and labels of the contract.

Labels stay bounded: ``route`` is a route name from the policy or
``unmatched``; ``method`` is one of the HTTP methods the policy knows, else
``OTHER``; ``code`` is an errorCode; ``kind`` one of four words. Nothing from
a request is used as a label verbatim.

Beyond the contract's metrics, ``gateway_principal_requests_total`` counts
requests by caller: ``principal`` is a name from the policy's ``principals``
for a caller that proved it with that principal's own credential, else
``other``: a name vouched for by trusted headers is ``other`` even when it
spells a policy principal's name, so its label set is bounded by the policy
too and a peer cannot book its requests to another principal. Requests
refused before a caller was identified are not in it (they have no principal).

With several worker processes each one writes its values to files in one
folder, and a scrape sums them (prometheus-client's multiprocess mode). Who
runs which way is said when a ``Metrics`` is made: ``multiprocess_dir`` names
that folder (the supervisor's and each worker's), None keeps the values in
this process. This module can be imported at any time, before or after the
folder is known: see ``_keep_values``.

A request's observations cost a few dictionary updates: they are added up
here and handed to prometheus-client (its locks, its bucket search and, with
workers, its file writes) in one go, by ``flush``. Every collection of the
registry flushes first, so a scrape is exact; with workers, whose scrapes read
the files, a flush also runs at the end of every event-loop turn that recorded
something, so the files trail the answers by at most that turn.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from gateway import __version__
from gateway.names import METHODS

# From well under a millisecond (a rejection) to the longest upstream timeout.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000)
# The same, with +Inf: what prometheus-client counts into (``_observe``).
LATENCY_BOUNDS: Final = (*LATENCY_BUCKETS, float("inf"))
BATCH_BOUNDS: Final = (*(float(b) for b in BATCH_BUCKETS), float("inf"))
OTHER_PRINCIPAL: Final = "other"
VOUCHED: Final = "trusted-headers"  # a Caller's ``via`` when a peer only said the name
_METHODS: Final = frozenset(METHODS)

__all__ = ["CONTENT_TYPE", "Metrics"]

# The *_created series double the exposition and no dashboard here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# One value class per folder: each keeps its files open, and two open on one file
# would overwrite each other's entries.
_multiprocess_values: dict[str, Any] = {}


def _keep_values(multiprocess_dir: str | None) -> None:
    """Make the metrics created from now on keep their values in this process
    (None), or in files under ``multiprocess_dir`` that a scrape sums.

    prometheus-client chooses once, when ``prometheus_client.values`` is first
    imported: multiprocess if ``PROMETHEUS_MULTIPROC_DIR`` is set then. That would
    make every importer of this module wait for the folder. But each metric (and
    each labelled child) takes its value class from ``values.ValueClass`` when it
    is created, so setting that attribute here moves the choice to the moment a
    ``Metrics`` is made. It stays one choice per process (a module attribute):
    a process makes one ``Metrics``. The variable is still set, because a
    multiprocess value names its file from it whenever it opens one.
    """
    if multiprocess_dir is None:
        values.ValueClass = values.MutexValue
        return
    chosen = _multiprocess_values.get(multiprocess_dir)
    if chosen is None:
        current = values.ValueClass
        # Chosen at import, from the variable this process was started with: keep it.
        inherited = getattr(current, "_multiprocess", False)
        if inherited and os.environ.get(_MULTIPROC_ENV) == multiprocess_dir:
            chosen = current
        else:
            chosen = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _multiprocess_values[multiprocess_dir] = chosen
    os.environ[_MULTIPROC_ENV] = multiprocess_dir
    values.ValueClass = chosen


# What a request adds up, keyed by (metric, label values...): counter increments,
# and for histograms one count per bucket (+Inf last) followed by the sum.
Counts = dict[tuple[str, ...], float]
Observed = dict[tuple[str, ...], list[float]]


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        """``multiprocess_dir``: the folder whose files every process of a
        ``serve --workers N`` writes and ``render`` sums; None for a lone process."""
        _keep_values(multiprocess_dir)
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # First of all, so that every collection flushes before it reads a value.
        r.register(_Flush(self))
        self.requests = Counter(
            "gateway_requests_total",
            "Proxied requests answered, by route, method and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time spent on the upstream exchange, all attempts.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "gateway_rejections_total",
            "Errors the gateway answered itself, by errorCode.",
            ("route", "code"),
            registry=r,
        )
        self.batch_items = Histogram(
            "gateway_batch_items",
            "Items in batches that passed validation.",
            ("route",),
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failed upstream attempts, by kind.",
            ("route", "kind"),
            registry=r,
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries_total",
            "Upstream attempts repeated, by reason (connect, throttle).",
            ("route", "reason"),
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Proxied requests being handled now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads, by result.",
            ("result",),
            registry=r,
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "The running version.",
            ("version",),
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.principal_requests = Counter(
            "gateway_principal_requests_total",
            "Requests by identified caller (policy principals, else other), route and status.",
            ("principal", "route", "status"),
            registry=r,
        )
        self.rate_limited_total = Counter(
            "gateway_rate_limited_total",
            "Requests refused 429 by a rate limit, by the refusing limit and route.",
            ("limit", "route"),
            registry=r,
        )
        self.state_errors = Counter(
            "gateway_state_errors_total",
            "Shared-state calls that failed or timed out, by op (replay, limits).",
            ("op",),
            registry=r,
        )
        # Both series exist from the start, so an alert on their increase sees the first one.
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for op in ("replay", "limits"):
            self.state_errors.labels(op)
        # The names that get a principal label of their own; set from the policy.
        self.principals: frozenset[str] = frozenset()
        self._children: dict[tuple[str, ...], Any] = {}
        self._metric = {
            "requests": self.requests, "duration": self.duration,
            "upstream_duration": self.upstream_duration, "rejections": self.rejections,
            "batch_items": self.batch_items, "upstream_errors": self.upstream_errors,
            "upstream_retries": self.upstream_retries,
            "principal_requests": self.principal_requests,
            "rate_limited": self.rate_limited_total, "state_errors": self.state_errors,
        }  # fmt: skip
        self._counts: Counts = {}
        self._observed: Observed = {}
        self._in_flight = 0  # now; the gauge is set from it by flush
        self._in_flight_shown = 0
        # With workers, the files must catch up by themselves; alone, scrapes flush.
        self._flush_each_turn = multiprocess_dir is not None
        self._flush_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- recording: plain arithmetic on the event loop's thread ----------------------------

    def entered(self) -> None:
        """A proxied request began (``gateway_in_flight_requests``)."""
        self._in_flight += 1
        if self._flush_each_turn:
            self._soon()

    def left(self) -> None:
        self._in_flight -= 1
        if self._flush_each_turn:
            self._soon()

    def request(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float,
        principal: str | None = None,
        via: str | None = None,
    ) -> None:
        label = method if method in _METHODS else "OTHER"
        code = str(status)
        counts = self._counts
        key: tuple[str, ...] = ("requests", route, label, code)
        counts[key] = counts.get(key, 0) + 1
        key = ("duration", route)
        added = self._observed.get(key)
        if added is None:  # (_observe, inlined: this runs for every request)
            added = self._observed[key] = [0.0] * (len(LATENCY_BOUNDS) + 1)
        added[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        added[-1] += seconds
        if principal is not None:
            named = principal in self.principals and via != VOUCHED
            who = principal if named else OTHER_PRINCIPAL
            key = ("principal_requests", who, route, code)
            counts[key] = counts.get(key, 0) + 1
        if self._flush_each_turn:
            self._soon()

    def rejected(self, route: str, code: str) -> None:
        self._count(("rejections", route, code))

    def rate_limited(self, limit: str, route: str) -> None:
        self._count(("rate_limited", limit, route))

    def state_error(self, op: str) -> None:
        self._count(("state_errors", op))

    def _count(self, key: tuple[str, ...]) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._flush_each_turn:
            self._soon()

    def batch(self, route: str, items: int) -> None:
        self._observe(("batch_items", route), BATCH_BOUNDS, items)

    def upstream(self, route: str, seconds: float, failures: list[str], retries: list[str]) -> None:
        self._observe(("upstream_duration", route), LATENCY_BOUNDS, seconds)
        counts = self._counts
        for kind in failures:
            key = ("upstream_errors", route, kind)
            counts[key] = counts.get(key, 0) + 1
        for reason in retries:
            key = ("upstream_retries", route, reason)
            counts[key] = counts.get(key, 0) + 1

    def _observe(self, key: tuple[str, ...], bounds: tuple[float, ...], value: float) -> None:
        added = self._observed.get(key)
        if added is None:
            added = self._observed[key] = [0.0] * (len(bounds) + 1)
        # The first bucket whose upper bound is >= value, as prometheus-client counts.
        added[bisect_left(bounds, value)] += 1
        added[-1] += value

    def _soon(self) -> None:
        """Flush at the end of this event-loop turn (at once if no loop runs)."""
        loop = self._loop
        if loop is None or not loop.is_running():  # (asking asyncio costs a getpid(2))
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a script, a test): nothing to wait for
                self.flush()
                return
            self._flush_pending = False
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_soon(self.flush)

    # --- handing the sums to prometheus-client ------------------------------------------------

    def flush(self) -> None:
        """Add everything recorded since the last flush to the Prometheus metrics."""
        self._flush_pending = False
        counts, self._counts = self._counts, {}
        for (name, *labels), amount in counts.items():
            self._child(name, *labels).inc(amount)
        observed, self._observed = self._observed, {}
        for (name, *labels), added in observed.items():
            child = self._child(name, *labels)
            # The histogram's own values: observe() would search the buckets and lock
            # once per observation; these are already counted per bucket.
            for bucket, count in zip(child._buckets, added, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(added[-1])
        if self._in_flight != self._in_flight_shown:
            self.in_flight.set(self._in_flight)
            self._in_flight_shown = self._in_flight

    def _child(self, name: str, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once: labels() validates and locks."""
        key = (name, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metric[name].labels(*values)
        return child


class _Flush:
    """A collector with no metrics of its own: registered first, it flushes the
    sums recorded so far before the registry's metrics are read."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        self._metrics.flush()
        return iter(())


def render(metrics: Metrics) -> bytes:
    """The text exposition: this process's registry, or all workers' files."""
    if metrics.multiprocess_dir is not None:
        metrics.flush()  # this process's own, if it records any
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=metrics.multiprocess_dir
        )
        return generate_latest(registry)
    return generate_latest(metrics.registry)


def mark_process_dead(metrics: Metrics, pid: int) -> None:
    """Drop a dead worker's live gauges (its in-flight count) from the sum."""
    if metrics.multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, metrics.multiprocess_dir)  # type: ignore[no-untyped-call]
