"""Micro-benchmarks of the pure hot path (pytest-benchmark; not part of ``make test``).

    .venv/bin/pytest bench/test_micro.py --benchmark-only

Targets (docs/performance.md): signing ≤ 5 µs; parse + validate 1000 IDs ≤ 100 µs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
from typing import Any

from multidict import CIMultiDict

from gateway import batch, tracing, walk
from gateway.batch import BatchRule
from gateway.identity import verifier_for
from gateway.policy import Policy
from gateway.principals import Principal, TrustedHeaders
from gateway.routes import Route
from gateway.signing import Secret, Signer

TOKEN = "bench-member-token"
RULE = BatchRule(
    field="recordIds",
    max_items=1000,
    item_pattern=re.compile(r"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$"),
)
RESTORE = "/crm-core/v1/records/bulk/restore"


def body(n: int) -> bytes:
    return json.dumps({"recordIds": [f"CRMRC{i:016d}BENCH{i:06d}" for i in range(n)]}).encode()


def policy() -> Policy:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    route = Route(
        name="records-bulk-restore", method="POST", path=RESTORE, min_role="MEMBER", batch=RULE
    )
    trusted = TrustedHeaders(
        principal="X-P", role="X-R", sources=(ipaddress.ip_network("127.0.0.1/32"),)
    )
    principals = (Principal(name="bench-svc", role="MEMBER", token_sha256=digest),)
    return Policy(
        roles=("VIEWER", "MEMBER", "OWNER"),
        principals=principals,
        trusted_headers=trusted,
        routes=(route,),
    )


def test_sign_one_header(benchmark: Any) -> None:
    signer = Signer("NCSBENCH00000001", Secret("bench-secret-bench-secret"))
    header = benchmark(signer.fresh_header)
    assert header.startswith("HMAC-SHA256 apiKey=NCSBENCH00000001, date=")


def test_parse_and_validate_1000_ids(benchmark: Any) -> None:
    raw = body(1000)
    assert benchmark(batch.validate, raw, RULE) == 1000


def test_parse_and_validate_10_ids(benchmark: Any) -> None:
    raw = body(10)
    assert benchmark(batch.validate, raw, RULE) == 10


def test_decision_path_for_a_10_id_request(benchmark: Any) -> None:
    rules = policy()
    verifier = verifier_for(rules)
    headers = CIMultiDict({"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    raw = body(10)

    def decide() -> walk.Decision:
        return walk.decide(
            "POST", RESTORE, headers, "127.0.0.1", raw, rules, verifier, time.time(), 1 << 20
        )

    decision = benchmark(decide)
    assert decision.would_forward and decision.items is not None


def test_decision_path_as_the_live_gateway_walks_it(benchmark: Any) -> None:
    """The same walk with no explain steps recorded (``Decision(explain=False)``)."""
    rules = policy()
    verifier = verifier_for(rules)
    headers = CIMultiDict({"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    raw = body(10)

    def live() -> walk.Decision:
        d = walk.Decision("POST", RESTORE, explain=False)
        walk.locate(d, headers, rules)
        walk.admit(d, headers, "127.0.0.1", rules, verifier, time.time())
        walk.check_body(d, headers, raw, rules, 1 << 20)
        return d

    decision = benchmark(live)
    assert decision.error is None and decision.items is not None and not decision.steps


# --- tracing: what it costs a request when no tracing: key is configured ------------------
# Nothing but one header lookup (and, with a traceparent, one regex match); the SDK is not
# imported. Compare with test_decision_path_for_a_10_id_request: the whole walk.


def _traced_request(headers: CIMultiDict[str]) -> str | None:
    trace = tracing.OFF.begin(headers)
    upstream: CIMultiDict[str] = CIMultiDict()
    trace.to_upstream(upstream)
    trace.upstream_done(None)
    trace.finish(None)
    return trace.trace_id


def test_tracing_off_without_a_traceparent(benchmark: Any) -> None:
    headers = CIMultiDict({"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert benchmark(_traced_request, headers) is None


def test_tracing_off_with_a_traceparent_passed_on(benchmark: Any) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = CIMultiDict({"Authorization": f"Bearer {TOKEN}", "traceparent": parent})
    assert benchmark(_traced_request, headers) == "4bf92f3577b34da6a3ce929d0e0e4736"
