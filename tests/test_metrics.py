"""gateway/metrics.py: the contract's names, types and labels; buckets; bounded labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, OTHER_PRINCIPAL, Metrics

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def families(metrics: Metrics) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    text = generate_latest(metrics.registry).decode()
    return {
        f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
    }


def test_batch_buckets_are_the_contracts() -> None:
    assert BATCH_BUCKETS == (1, 10, 50, 100, 250, 500, 1000)


def test_latency_buckets_run_from_under_a_millisecond_to_past_the_upstream_timeout() -> None:
    assert LATENCY_BUCKETS[0] <= 0.0005
    assert LATENCY_BUCKETS[-1] >= 30  # the default upstream.timeout_s
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_a_fresh_registry_shows_reload_counters_and_build_info_at_once() -> None:
    found = families(Metrics())
    assert found["gateway_config_reloads"][0] == "counter"
    reloads = {s[1]["result"]: s[2] for s in found["gateway_config_reloads"][1]}
    assert reloads == {"success": 0.0, "failure": 0.0}
    assert found["gateway_in_flight_requests"][1] == [("gateway_in_flight_requests", {}, 0.0)]
    assert [s[2] for s in found["gateway_build_info"][1]] == [1.0]


def test_principals_outside_the_policy_count_as_other() -> None:
    metrics = Metrics()
    metrics.principals = frozenset({"billing-svc"})
    metrics.request("records-bulk-restore", "POST", 200, 0.01, "billing-svc")
    metrics.request("records-bulk-restore", "POST", 200, 0.01, "vouched-by-header")
    metrics.request("records-bulk-restore", "POST", 403, 0.01, "another-one")
    metrics.request("unmatched", "GET", 401, 0.001, None)  # never identified: not counted

    samples = {
        tuple(sorted(s[1].items())): s[2]
        for s in families(metrics)["gateway_principal_requests"][1]
    }
    route = ("route", "records-bulk-restore")
    assert samples == {
        (("principal", "billing-svc"), route, ("status", "200")): 1.0,
        (("principal", OTHER_PRINCIPAL), route, ("status", "200")): 1.0,
        (("principal", OTHER_PRINCIPAL), route, ("status", "403")): 1.0,
    }


def test_a_vouched_for_name_is_other_even_when_it_is_a_principals() -> None:
    metrics = Metrics()
    metrics.principals = frozenset({"billing-svc"})
    metrics.request("r", "GET", 200, 0.01, "billing-svc", "trusted-headers")  # a peer says so
    metrics.request("r", "GET", 200, 0.01, "billing-svc", "token")  # its own token
    metrics.request("r", "GET", 200, 0.01, "billing-svc", "hmac")  # its own key pair
    samples = {s[1]["principal"]: s[2] for s in families(metrics)["gateway_principal_requests"][1]}
    assert samples == {"billing-svc": 2.0, OTHER_PRINCIPAL: 1.0}


def test_unknown_methods_are_counted_as_other() -> None:
    metrics = Metrics()
    metrics.request("unmatched", "BREW", 401, 0.001)
    (sample,) = families(metrics)["gateway_requests"][1]
    assert sample[1] == {"route": "unmatched", "method": "OTHER", "status": "401"}


# --- several processes: the mode is chosen when Metrics is made, not at import -----------------

COUNT_ONE = """
import os, sys
import gateway.metrics as m  # imported before anyone says which mode
metrics = m.Metrics(multiprocess_dir=sys.argv[1] or None)
metrics.request("records-bulk-restore", "POST", 200, 0.01)
print(m.render(metrics).decode())
"""


def run_process(folder: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", COUNT_ONE, folder],
        env={k: v for k, v in os.environ.items() if k != MULTIPROC_ENV} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def requests_total(text: str) -> float:
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "gateway_requests"]
    return sum(s.value for s in family.samples)


def test_processes_given_one_folder_are_summed_whenever_the_module_was_imported(
    tmp_path: Path,
) -> None:
    folder = str(tmp_path)
    run_process(folder, {})
    run_process(folder, {})  # another pid, its own files
    # A third process, started with the variable already set (as a worker inherits it).
    text = run_process(folder, {MULTIPROC_ENV: folder})
    assert requests_total(text) == 3
    assert 'gateway_build_info{version="' in text and "pid=" not in text
    assert len([n for n in os.listdir(folder) if n.startswith("counter_")]) == 3


def test_a_lone_process_keeps_its_values_even_if_the_variable_is_set(tmp_path: Path) -> None:
    text = run_process("", {MULTIPROC_ENV: str(tmp_path)})
    assert requests_total(text) == 1
    assert os.listdir(tmp_path) == []  # nothing written for others to sum


# --- sums kept between scrapes: exact whenever the registry is read -------------------------


def test_sums_recorded_between_scrapes_equal_prometheus_own_observations() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    values = [0.0, 0.0005, 0.0004999, 0.00051, 0.01, 0.7, 30.0, 60.0, 61.0, 1e-9, 2.5]
    metrics = Metrics()
    reference = CollectorRegistry()
    duration = Histogram(
        "gateway_request_duration_seconds", "", ("route",), buckets=LATENCY_BUCKETS,
        registry=reference,
    )  # fmt: skip
    requests = Counter(
        "gateway_requests_total", "", ("route", "method", "status"), registry=reference
    )
    for value in values:
        metrics.request("r", "POST", 200, value)
        duration.labels("r").observe(value)
        requests.labels("r", "POST", "200").inc()

    def samples(text: str, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}

    ours, theirs = generate_latest(metrics.registry).decode(), generate_latest(reference).decode()
    for name in ("gateway_request_duration_seconds", "gateway_requests"):
        assert samples(ours, name) == samples(theirs, name)


def test_a_scrape_sees_every_request_recorded_before_it_and_the_requests_in_flight() -> None:
    metrics = Metrics()
    metrics.entered()
    metrics.entered()
    metrics.request("r", "GET", 200, 0.01)
    metrics.left()
    found = families(metrics)
    assert found["gateway_in_flight_requests"][1] == [("gateway_in_flight_requests", {}, 1.0)]
    assert ("gateway_requests_total", {"route": "r", "method": "GET", "status": "200"}, 1.0) in (
        found["gateway_requests"][1]
    )
    metrics.request("r", "GET", 200, 0.01)  # and again: what a second scrape adds is exact too
    counted = [s for s in families(metrics)["gateway_requests"][1] if s[0].endswith("_total")]
    assert counted == [
        ("gateway_requests_total", {"route": "r", "method": "GET", "status": "200"}, 2.0)
    ]


async def test_with_workers_the_files_catch_up_by_the_end_of_the_loop_turn(tmp_path: Path) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry, multiprocess

    def in_files() -> float:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        text = generate_latest(registry).decode()
        return requests_total(text) if "gateway_requests_total" in text else 0

    old = os.environ.get(MULTIPROC_ENV)
    try:
        metrics = Metrics(multiprocess_dir=str(tmp_path))
        metrics.request("r", "POST", 200, 0.01)
        metrics.request("r", "POST", 200, 0.01)
        assert in_files() == 0  # summed, not yet written
        await asyncio.sleep(0)
        assert in_files() == 2  # one write for the turn's requests
    finally:
        from gateway.metrics import _keep_values

        _keep_values(None)
        if old is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = old
