"""gateway/metrics.py: the contract's names, types and labels; buckets; bounded labels."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, OTHER_PRINCIPAL, Metrics


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


def test_unknown_methods_are_counted_as_other() -> None:
    metrics = Metrics()
    metrics.request("unmatched", "BREW", 401, 0.001)
    (sample,) = families(metrics)["gateway_requests"][1]
    assert sample[1] == {"route": "unmatched", "method": "OTHER", "status": "401"}
