"""gateway/limits.py: the ``limits:`` policy key and the arithmetic every backend applies.

Contradictory definitions are config errors with FILE:LINE; a limit is a token
bucket in one number (GCRA); a request's limits pass together or not at all,
and a refused one consumes nothing; the 429 names the refusing limit in the
IETF draft's headers; ``explain`` and ``check-config`` show the limits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway import cli, limits, report
from gateway.limits import Charge, charges, decide
from gateway.policy import Policy, parse_policy

ROUTES = """\
roles: [VIEWER, MEMBER]
principals:
  - name: billing
    role: MEMBER
    token_sha256: "{sha}"
routes:
  - name: restore
    method: POST
    path: /restore
    min_role: MEMBER
    batch: {{field: recordIds, max_items: 1000}}
  - name: balance
    method: GET
    path: /balance
    min_role: VIEWER
limits:
"""
TOKEN = "billing-token"


def policy_with(limits_text: str) -> tuple[Policy | None, list[str]]:
    text = ROUTES.format(sha=hashlib.sha256(TOKEN.encode()).hexdigest()) + limits_text
    policy, problems = parse_policy(text, "policy.yaml")
    return policy, [str(p) for p in problems]


def limited(limits_text: str) -> Policy:
    policy, problems = policy_with(limits_text)
    assert policy is not None, problems
    return policy


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "  - {name: a, key: principal, routes: ['*'], requests_per_s: 5, items_per_s: 9}\n",
            "policy.yaml:17: limits[0]: give exactly one of requests_per_s, requests_per_min,"
            " items_per_s, items_per_min: it gives requests_per_s and items_per_s",
        ),
        (
            "  - {name: a, key: principal, routes: ['*']}\n",
            "policy.yaml:17: limits[0]: give exactly one of requests_per_s, requests_per_min,"
            " items_per_s, items_per_min: it gives none",
        ),
        (
            "  - {name: a, key: principal, routes: ['*'], requests_per_s: 0}\n",
            "policy.yaml:17: limits[0].requests_per_s: must be at least 1",
        ),
        (
            "  - {name: a, key: principal, routes: ['*'], items_per_min: -5}\n",
            "policy.yaml:17: limits[0].items_per_min: must be at least 1",
        ),
        (
            "  - {name: a, key: principal, routes: ['*'], requests_per_s: 5, burst: 0}\n",
            "policy.yaml:17: limits[0].burst: must be at least 1",
        ),
        (
            "  - name: a\n    key: principal\n    routes: [restore, nope]\n    requests_per_s: 5\n",
            "policy.yaml:19: limits[0].routes[1]: unknown route 'nope'",
        ),
        (
            "  - {name: a, key: principal, routes: [restore, restore], requests_per_s: 5}\n",
            "policy.yaml:17: limits[0].routes[1]: route restore is listed twice",
        ),
        (
            "  - {name: a, key: principal, routes: ['*', restore], requests_per_s: 5}\n",
            'policy.yaml:17: limits[0].routes: "*" already names every route: list it alone',
        ),
        (
            "  - {name: a, key: principal, routes: [], requests_per_s: 5}\n",
            'policy.yaml:17: limits[0].routes: list at least one route name, or "*"',
        ),
        (
            "  - {name: a, key: account, routes: ['*'], requests_per_s: 5}\n",
            "policy.yaml:17: limits[0].key: must be principal or global",
        ),
        (
            "  - {name: a, key: global, routes: ['*'], requests_per_s: 5}\n"
            "  - {name: a, key: global, routes: ['*'], requests_per_s: 6}\n",
            "policy.yaml:18: limits[1].name: limit name a is used twice",
        ),
        (
            "  - {name: a, key: global, routes: ['*'], requests_per_s: 5, rate: 3}\n",
            "policy.yaml:17: limits[0].rate: unknown key (allowed: burst, items_per_min,",
        ),
    ],
)
def test_contradictory_definitions_are_errors_with_file_and_line(text: str, problem: str) -> None:
    policy, problems = policy_with(text)
    assert policy is None
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def one(policy: Policy, route: str = "balance", items: int = 0) -> list[Charge]:
    return charges(policy.limits, route, "billing", items)


def test_a_bucket_lets_its_burst_pass_at_once_then_refills_at_its_rate() -> None:
    policy = limited(
        "  - {name: r, key: principal, routes: ['*'], requests_per_s: 10, burst: 20}\n"
    )
    found, tat, now = one(policy), None, 100.0
    for _ in range(20):
        verdict = decide(found, [tat], now)
        assert verdict.allowed
        tat = verdict.tats[0]
    refused = decide(found, [tat], now)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.1)
    assert decide(found, [tat], now + 0.1).allowed  # one more after a tenth of a second
    assert not decide(found, [tat], now + 0.05).allowed


def test_items_count_by_the_batch_and_a_request_without_one_costs_nothing() -> None:
    policy = limited("  - {name: i, key: principal, routes: [restore], items_per_min: 1500}\n")
    (charge,) = one(policy, "restore", 1000)
    assert charge.cost == 1000
    first = decide([charge], [None], 0.0)
    assert first.allowed
    assert not decide([charge], first.tats, 0.0).allowed  # 2000 > 1500 at once
    small = one(policy, "restore", 10)
    assert decide(small, first.tats, 0.0).allowed  # 1010 fits
    assert one(policy, "balance") == []  # not on this route
    assert one(policy, "restore", 0) == []  # no batch: nothing to count


def test_several_limits_pass_together_or_consume_nothing() -> None:
    policy = limited(
        "  - {name: calls, key: principal, routes: ['*'], requests_per_s: 100}\n"
        "  - {name: items, key: global, routes: [restore], items_per_s: 50}\n"
    )
    found = one(policy, "restore", 40)
    assert [c.limit.name for c in found] == ["calls", "items"]
    assert found[1].bucket.endswith("|*")  # global: one bucket for every caller
    ok = decide(found, [None, None], 0.0)
    assert ok.allowed
    refused = decide(found, ok.tats, 0.0)  # 80 items > 50: the items limit refuses
    assert not refused.allowed and found[refused.refused].limit.name == "items"
    assert refused.tats == []  # nothing to store: the calls bucket is left as it was


def test_a_limit_edited_in_any_way_starts_afresh_and_one_left_alone_keeps_counting() -> None:
    a = limited("  - {name: x, key: principal, routes: ['*'], requests_per_s: 5}\n")
    same = limited("  - {name: x, key: principal, routes: ['*'], requests_per_s: 5}\n")
    edited = limited("  - {name: x, key: principal, routes: ['*'], requests_per_s: 6}\n")
    assert one(a)[0].bucket == one(same)[0].bucket
    assert one(a)[0].bucket != one(edited)[0].bucket


def test_the_429_names_the_refusing_limit_in_the_ietf_headers() -> None:
    policy = limited(
        "  - {name: per-svc, key: principal, routes: ['*'], requests_per_s: 50, burst: 100}\n"
        "  - {name: records, key: principal, routes: ['*'], items_per_min: 1500}\n"
    )
    error = limits.refusal(one(policy)[0], 0.3)
    assert error.status == 429 and error.code == "RateLimited"
    assert error.headers == {
        "Retry-After": "1",  # whole seconds, rounded up
        "RateLimit-Policy": '"per-svc";q=100;w=2',  # a burst of 100, refilled in 2 s
        "RateLimit": '"per-svc";r=0;t=1',
    }
    items = limits.refusal(one(policy, "restore", 2000)[1], 60)
    assert items.headers["RateLimit-Policy"] == '"records";q=1500;w=60;qu="items"'
    assert "can never pass" in items.message


def test_check_config_summarises_limits_and_warns_of_a_burst_below_a_batch() -> None:
    policy = limited(
        "  - {name: calls, key: principal, routes: ['*'], requests_per_s: 50, burst: 100}\n"
        "  - {name: items, key: global, routes: [restore], items_per_min: 500}\n"
    )
    lines = report.policy_summary(policy)
    assert "  2 rate limit(s):" in lines
    assert "    calls: 50 requests/s, burst 100, per principal; on every route" in lines
    assert "    items: 500 items/min, per global; on restore" in lines
    assert [str(w) for w in policy.warnings] == [
        "policy.yaml:18: limits[1]: lets 500 items pass at once, but route restore allows"
        " batches of 1000: larger batches than the burst can never pass"
    ]


def test_explain_shows_which_limits_apply_and_refuses_a_batch_larger_than_the_burst(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = Path(__file__).parent.parent / "config" / "demo"
    for name in ("gateway.yaml", "api_secret"):
        (tmp_path / name).write_bytes((demo / name).read_bytes())
    (tmp_path / "policy.yaml").write_text(
        (demo / "policy.yaml").read_text()
        + "limits:\n"
        + "  - {name: calls, key: principal, routes: ['*'], requests_per_s: 5}\n"
        + "  - {name: items, key: principal, routes: [records-bulk-restore], items_per_s: 2}\n"
    )
    body = tmp_path / "ids.json"
    ids = [f"CRMRC2026112800000000TRASH00000{i}" for i in range(1, 4)]
    body.write_text('{"recordIds": ["' + '", "'.join(ids) + '"]}')
    args = ["explain", "--config", str(tmp_path / "gateway.yaml"), "--token", "demo-member-token"]
    assert cli.main([*args, "GET", "/crm-core/v1/records/trash"]) == 0
    line = capsys.readouterr().out.splitlines()[-2]
    assert line.startswith("  limits    ok       calls: 1 requests of 5 requests/s, per principal")
    assert "[counted by the running gateway" in line
    restore = "/crm-core/v1/records/bulk/restore"
    assert cli.main([*args, "--body", str(body), "POST", restore]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("  limits    REFUSED  429 RateLimited: limit items")
    assert out[-1] == "would refuse: 429 RateLimited"
