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
"""

from __future__ import annotations

import os
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
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once: labels() validates and locks
        on every call, and these few children are used on every request."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

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
        self._child(self.requests, route, label, code).inc()
        self._child(self.duration, route).observe(seconds)
        if principal is not None:
            named = principal in self.principals and via != VOUCHED
            who = principal if named else OTHER_PRINCIPAL
            self._child(self.principal_requests, who, route, code).inc()

    def rejected(self, route: str, code: str) -> None:
        self._child(self.rejections, route, code).inc()

    def rate_limited(self, limit: str, route: str) -> None:
        self._child(self.rate_limited_total, limit, route).inc()

    def state_error(self, op: str) -> None:
        self._child(self.state_errors, op).inc()

    def batch(self, route: str, items: int) -> None:
        self._child(self.batch_items, route).observe(items)

    def upstream(self, route: str, seconds: float, failures: list[str], retries: list[str]) -> None:
        self._child(self.upstream_duration, route).observe(seconds)
        for kind in failures:
            self._child(self.upstream_errors, route, kind).inc()
        for reason in retries:
            self._child(self.upstream_retries, route, reason).inc()


def render(metrics: Metrics) -> bytes:
    """The text exposition: this process's registry, or all workers' files."""
    if metrics.multiprocess_dir is not None:
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
