"""Operating the gateway: metrics, access and audit logs, SIGHUP, SIGTERM, workers.

Real gateway processes on real sockets, real signals. What an operator checks:
after a known mix of traffic /metrics holds exactly those counts (and is not on
the proxy port); every access-log line is JSON with the documented fields and
no secret; a reload applies a new policy or secret, keeps the old set when the
new one is invalid, and leaves requests in flight alone; a drain answers every
request in flight and refuses new connections; ``--workers 2`` sums its
metrics over workers, dead ones included, and replaces a killed worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import RawTestServer
from prometheus_client import generate_latest
from support import (
    Behaviour,
    Creds,
    FakeUpstream,
    GatewayProc,
    Received,
    Reply,
    SandboxProc,
    family,
    free_port,
    free_ports,
    gateway_policy,
    hang,
    ids_body,
    json_lines,
    labelled,
    poll,
    random_id,
    replying,
    reset,
    sample,
    samples_of,
    write_gateway_config,
)

from gateway import __version__, config
from gateway.metrics import BATCH_BUCKETS, Metrics
from gateway.names import METHODS
from gateway.server import Gateway

RESTORE = "/crm-core/v1/records/bulk/restore"
RESTORE_ROUTE = "records-bulk-restore"
TRASH = "/crm-core/v1/records/trash"
TRASH_ROUTE = "records-trash"
JSON_TYPE = "application/json"
# The access-log fields docs/metrics.md promises on a request that went upstream.
ACCESS_FIELDS = {
    "time", "event", "request_id", "method", "path", "peer", "route", "principal", "role",
    "via", "status", "batch_items", "duration_ms", "upstream_ms", "upstream_status", "attempts",
}  # fmt: skip
CONTRACT_METRICS = {
    "gateway_requests_total": "counter",
    "gateway_request_duration_seconds": "histogram",
    "gateway_upstream_duration_seconds": "histogram",
    "gateway_rejections_total": "counter",
    "gateway_batch_items": "histogram",
    "gateway_upstream_errors_total": "counter",
    "gateway_in_flight_requests": "gauge",
    "gateway_config_reloads_total": "counter",
    "gateway_build_info": "gauge",
}


# --- helpers ------------------------------------------------------------------------------


def bearer(creds: Creds, role: str, **extra: str) -> dict[str, str]:
    return {"Content-Type": JSON_TYPE, "Authorization": creds.bearer(role), **extra}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path} no longer holds {old!r}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def refused(port: int) -> bool:
    """True if a new TCP connection to ``port`` is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def send(
    session: aiohttp.ClientSession,
    gateway: GatewayProc,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    return await gateway.send(session, method, path, headers=headers, data=data)


# --- an upstream that fails on request ------------------------------------------------------


async def garbage(received: Received, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    return False


# Every answer closes the connection, so that each attempt is on a fresh one.
MODES: dict[str, Behaviour] = {
    "ok": replying(200, close=True),
    "500": replying(500, close=True),
    "reset": reset,  # RST before any answer
    "garbage": garbage,  # not HTTP
    "slow": hang,  # never answers
}


async def by_mode(received: Received, writer: asyncio.StreamWriter) -> bool:
    """Answer as the query's ``mode`` says (ok if it says nothing)."""
    return await MODES[received.query.get("mode", "ok")](received, writer)


# --- metrics: exactly the traffic sent --------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request of the known mix, and what the gateway should make of it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    code: str | None = None  # the gateway's errorCode, if it answers itself
    route: str = "unmatched"
    batch: int | None = None  # items, if the batch passed validation
    upstream: str | None = None  # "answer" or the kind of upstream failure
    principal: str | None = None  # the per-principal label, if identified


def known_mix(creds: Creds) -> list[Case]:
    member, owner, viewer = (bearer(creds, r) for r in ("MEMBER", "OWNER", "VIEWER"))
    trusted = {
        "Content-Type": JSON_TYPE,
        "X-Internal-Principal": "ops-console",  # not in the policy: counted as "other"
        "X-Internal-Role": "MEMBER",
    }
    stranger = bearer(creds, "MEMBER", Authorization=f"Bearer sgw_{secrets.token_urlsafe(24)}")
    r, t = RESTORE_ROUTE, TRASH_ROUTE
    ok = "answer"

    def ids(n: int) -> bytes:
        return ids_body([random_id() for _ in range(n)])

    return [
        # accepted, batches of 1, 10, 11 and 1000 items
        Case("POST", RESTORE, member, ids(1), 200, None, r, 1, ok, "test-member"),
        Case("POST", RESTORE, owner, ids(10), 200, None, r, 10, ok, "test-owner"),
        Case("POST", RESTORE, trusted, ids(11), 200, None, r, 11, ok, "other"),
        Case("POST", RESTORE, member, ids(1000), 200, None, r, 1000, ok, "test-member"),
        Case("GET", TRASH, viewer, b"", 200, None, t, None, ok, "test-viewer"),
        # upstream's own 500 is an answer, not an upstream error
        Case("GET", TRASH + "?mode=500", viewer, b"", 500, None, t, None, ok, "test-viewer"),
        # each kind of refusal
        Case("POST", RESTORE, {"Content-Type": JSON_TYPE}, ids(1), 401, "Unauthorized", r),
        Case("POST", RESTORE, stranger, ids(1), 401, "Unauthorized", r),
        Case("POST", RESTORE, viewer, ids(1), 403, "Forbidden", r, principal="test-viewer"),
        Case("GET", "/crm-core/v1/nowhere", viewer, b"", 404, "RouteNotFound",
             principal="test-viewer"),
        Case("DELETE", RESTORE, owner, b"", 405, "MethodNotAllowed", principal="test-owner"),
        Case("POST", RESTORE, member, b" " * 70_000, 413, "PayloadTooLarge", r,
             principal="test-member"),
        Case("POST", RESTORE, {**member, "Content-Type": "text/plain"}, ids(1), 415,
             "UnsupportedMediaType", r, principal="test-member"),
        Case("POST", RESTORE, member, b'{"recordIds": [', 400, "InvalidJSON", r,
             principal="test-member"),
        Case("POST", RESTORE, member, b'{"other": []}', 400, "InvalidBody", r,
             principal="test-member"),
        Case("POST", RESTORE, member, ids(0), 400, "BatchEmpty", r, principal="test-member"),
        Case("POST", RESTORE, member, ids(1001), 400, "BatchTooLarge", r,
             principal="test-member"),
        Case("POST", RESTORE, member, ids_body(["CRMRC1"]), 400, "InvalidItem", r,
             principal="test-member"),
        Case("POST", RESTORE, member, ids_body([random_id()] * 2), 400, "DuplicateItems", r,
             principal="test-member"),
        # each kind of upstream failure but "connect" (that one comes last)
        Case("GET", TRASH + "?mode=reset", viewer, b"", 502, "UpstreamUnavailable", t, None,
             "reset", "test-viewer"),
        Case("GET", TRASH + "?mode=garbage", viewer, b"", 502, "UpstreamUnavailable", t, None,
             "protocol", "test-viewer"),
        Case("GET", TRASH + "?mode=slow", viewer, b"", 504, "UpstreamTimeout", t, None,
             "timeout", "test-viewer"),
    ]  # fmt: skip


@pytest.mark.e2e
async def test_metrics_count_exactly_the_traffic_sent(
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    fake_upstream: FakeUpstream,
    http_session: aiohttp.ClientSession,
) -> None:
    fake_upstream.otherwise = by_mode
    gw = start_gateway(fake_upstream.url, timeout_s=1, connect_timeout_s=0.5)
    cases = known_mix(creds)
    rids: dict[str, Case] = {}
    for n, case in enumerate(cases):
        rid = f"mix-{n}"
        reply = await send(
            http_session, gw, case.method, case.path, {**case.headers, "X-Request-ID": rid},
            case.body,
        )  # fmt: skip
        assert reply.status == case.status, (n, reply.body[:200])
        if case.code is not None:
            assert reply.headers["X-Gateway-Error"] == case.code
        rids[rid] = case
    # A query quoting a token: the log keeps paths only, so the token shows nowhere.
    invalid_path = await gw.raw(
        f"GET /crm-core/../crm-core/v1/records/trash?t={creds.tokens['OWNER']} HTTP/1.1\r\n"
        "Host: x\r\nX-Request-ID: mix-path\r\nConnection: close\r\n\r\n".encode()
    )
    assert invalid_path.status == 400
    rids["mix-path"] = Case("GET", "/crm-core/..", {}, b"", 400, "InvalidPath")
    await fake_upstream.stop()  # from here on upstream refuses connections
    dead = await send(
        http_session, gw, "GET", TRASH, {**bearer(creds, "VIEWER"), "X-Request-ID": "mix-dead"}
    )
    assert dead.status == 502
    rids["mix-dead"] = Case(
        "GET", TRASH, {}, b"", 502, "UpstreamUnavailable", TRASH_ROUTE, None, "connect",
        "test-viewer",
    )  # fmt: skip

    samples = gw.metrics()
    again = gw.metrics()  # scrapes are admin requests: not counted
    assert family(again, "gateway_requests_total") == family(samples, "gateway_requests_total")

    # Every metric of the contract, with its type; nothing labelled by pid.
    status, text = gw.admin("/metrics")
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text.decode(), re.M))
    for name, kind in CONTRACT_METRICS.items():
        assert types.get(name) == kind, name
    assert not any("pid" in dict(labels) for _, labels in samples)

    access = {e["request_id"]: e for e in gw.access_lines()}
    expected_requests: Counter[tuple[str, str, str]] = Counter()
    expected_rejections: Counter[tuple[str, str]] = Counter()
    expected_errors: Counter[tuple[str, str]] = Counter()
    expected_principals: Counter[tuple[str, str, str]] = Counter()
    per_route: Counter[str] = Counter()
    upstream_per_route: Counter[str] = Counter()
    batches: list[int] = []
    for rid, case in rids.items():
        expected_requests[case.route, case.method, str(case.status)] += 1
        per_route[case.route] += 1
        if case.code is not None:
            expected_rejections[case.route, case.code] += 1
        if case.batch is not None:
            batches.append(case.batch)
        if case.upstream is not None:
            upstream_per_route[case.route] += 1
        if case.upstream not in (None, "answer"):
            # A refused connection may be retried: each failed attempt counts.
            expected_errors[case.route, case.upstream] += access[rid]["attempts"]
        if case.principal is not None:
            expected_principals[case.principal, case.route, str(case.status)] += 1

    assert family(samples, "gateway_requests_total") == {
        labelled(route=r, method=m, status=s): float(n)
        for (r, m, s), n in expected_requests.items()
    }
    assert family(samples, "gateway_rejections_total") == {
        labelled(route=r, code=c): float(n) for (r, c), n in expected_rejections.items()
    }
    assert {c for _, c in expected_rejections} >= {
        "InvalidPath", "InvalidJSON", "InvalidBody", "BatchEmpty", "BatchTooLarge",
        "InvalidItem", "DuplicateItems", "Unauthorized", "Forbidden", "RouteNotFound",
        "MethodNotAllowed", "PayloadTooLarge", "UnsupportedMediaType", "UpstreamUnavailable",
        "UpstreamTimeout",
    }  # fmt: skip
    assert family(samples, "gateway_upstream_errors_total") == {
        labelled(route=r, kind=k): float(n) for (r, k), n in expected_errors.items()
    }
    assert {k for _, k in expected_errors} == {"connect", "reset", "protocol", "timeout"}
    for route, n in per_route.items():
        assert sample(samples, "gateway_request_duration_seconds_count", route=route) == n
        assert (
            sample(samples, "gateway_request_duration_seconds_bucket", route=route, le="+Inf") == n
        )
    for route, n in upstream_per_route.items():
        assert sample(samples, "gateway_upstream_duration_seconds_count", route=route) == n
    assert set(family(samples, "gateway_upstream_duration_seconds_count")) == {
        labelled(route=r) for r in upstream_per_route
    }
    assert sample(samples, "gateway_batch_items_count", route=RESTORE_ROUTE) == len(batches)
    assert sample(samples, "gateway_batch_items_sum", route=RESTORE_ROUTE) == sum(batches)
    for bound in BATCH_BUCKETS:
        observed = sample(
            samples, "gateway_batch_items_bucket", route=RESTORE_ROUTE, le=f"{bound}.0"
        )
        assert observed == sum(1 for b in batches if b <= bound), bound
    assert sample(samples, "gateway_in_flight_requests") == 0
    assert sample(samples, "gateway_config_reloads_total", result="success") == 0
    assert sample(samples, "gateway_config_reloads_total", result="failure") == 0
    build = family(samples, "gateway_build_info")
    assert len(build) == 1 and next(iter(build.values())) == 1
    assert family(samples, "gateway_principal_requests_total") == {
        labelled(principal=p, route=r, status=s): float(n)
        for (p, r, s), n in expected_principals.items()
    }

    # /metrics is not served on the proxy port, whoever asks.
    for n, (headers, status) in enumerate(((({}, 401)), (bearer(creds, "OWNER"), 404))):
        rid = f"metrics-{n}"
        reply = await send(http_session, gw, "GET", "/metrics", {**headers, "X-Request-ID": rid})
        assert reply.status == status
        assert b"gateway_requests_total" not in reply.body
        rids[rid] = Case("GET", "/metrics", {}, b"", status, reply.headers["X-Gateway-Error"])

    # The access log: one JSON line per request, with the fields, and nothing secret.
    assert gw.proc.stop(signal.SIGTERM) == 0
    lines = gw.events()  # every line is JSON, or this fails
    access_lines = [e for e in lines if e["event"] == "access"]
    assert Counter(e["request_id"] for e in access_lines) == Counter(rids.keys())
    for line in access_lines:
        case = rids[line["request_id"]]
        assert (line["status"], line["route"], line["method"]) == (
            case.status, case.route, case.method
        )  # fmt: skip
        assert line.get("errorCode") == case.code
        assert line.get("batch_items") == case.batch
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        if case.upstream == "answer":
            assert ACCESS_FIELDS - {"batch_items"} <= set(line), line
            assert line["upstream_status"] == case.status
            assert line["attempts"] == 1
        if case.principal is not None:
            assert line["principal"] in (case.principal, "ops-console")
    stderr = gw.proc.stderr_text()
    secret_values = [creds.secret, *creds.tokens.values()]
    secret_values += [
        c.headers["Authorization"].split()[-1] for c in cases if "Authorization" in c.headers
    ]
    # What the gateway sent upstream: the signature and salt of every attempt.
    for header in fake_upstream.authorizations:
        secret_values += re.findall(r"(?:signature|salt)=([0-9A-Za-z-]+)", header)
    assert len(secret_values) > 20
    for secret_value in secret_values:
        assert secret_value not in stderr
        assert secret_value.encode() not in text
    # Nor any body: the IDs of the batch of 1000 are nowhere in the log.
    thousand = json.loads(cases[3].body)["recordIds"]
    assert not any(record_id in stderr for record_id in thousand)


@pytest.mark.e2e
async def test_labels_stay_bounded_whatever_the_requests(
    gateway: GatewayProc, creds: Creds, http_session: aiohttp.ClientSession
) -> None:
    trusted = {"X-Internal-Role": "MEMBER", "Content-Type": JSON_TYPE}
    for _ in range(15):
        junk = secrets.token_hex(6)
        await send(http_session, gateway, "GET", f"/crm-core/{junk}", bearer(creds, "OWNER"))
        await send(http_session, gateway, "PURGE", f"/{junk}?q={junk}", {"X-Junk": junk})
        vouched = {**trusted, "X-Internal-Principal": f"p-{junk}"}
        await send(http_session, gateway, "POST", RESTORE, vouched, ids_body([random_id()]))
        await send(http_session, gateway, "POST", RESTORE, bearer(creds, "MEMBER"), junk.encode())

    samples = gateway.metrics()
    policy = config.load(str(gateway.config_path)).policy
    routes = {r.name for r in policy.routes} | {"unmatched"}
    principals = {p.name for p in policy.principals} | {"other"}
    allowed = {
        "route": routes,
        "method": {*METHODS, "OTHER"},
        "principal": principals,
        "result": {"success", "failure"},
        "kind": {"connect", "timeout", "reset", "protocol"},
        "op": {"replay", "limits"},
        "limit": {limit.name for limit in policy.limits},
    }
    seen_methods = set()
    for (name, labels), _ in samples.items():
        for label, label_value in labels:
            if label in allowed:
                assert label_value in allowed[label], (name, label, label_value)
            elif label == "status":
                assert re.fullmatch(r"[1-5][0-9][0-9]", label_value), (name, label_value)
            elif label == "code":
                assert re.fullmatch(r"[A-Z][A-Za-z]+", label_value), (name, label_value)
            else:
                assert label in ("le", "version", "reason"), (name, label)
            if label == "method":
                seen_methods.add(label_value)
    assert "OTHER" in seen_methods  # PURGE was counted, as OTHER
    assert sample(samples, "gateway_principal_requests_total",
                 principal="other", route=RESTORE_ROUTE, status="200") >= 15  # fmt: skip


# --- SIGHUP: reload ------------------------------------------------------------------------


@pytest.mark.e2e
async def test_sighup_applies_a_new_policy_and_keeps_it_when_the_next_is_invalid(
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    gw = start_gateway()
    policy = gw.config_path.parent / "policy.yaml"

    async def viewer_restore() -> int:
        reply = await send(
            http_session, gw, "POST", RESTORE, bearer(creds, "VIEWER"), ids_body([random_id()])
        )
        return reply.status

    async def reload() -> None:
        seen = len(gw.events("reloaded")) + len(gw.events("reload_failed"))
        gw.proc.popen.send_signal(signal.SIGHUP)
        await poll(lambda: len(gw.events("reloaded")) + len(gw.events("reload_failed")) > seen)

    assert await viewer_restore() == 403
    edit(policy, "min_role: MEMBER\n    batch:", "min_role: VIEWER\n    batch:")
    await reload()
    assert await viewer_restore() == 200
    samples = gw.metrics()
    assert sample(samples, "gateway_config_reloads_total", result="success") == 1
    assert sample(samples, "gateway_config_reloads_total", result="failure") == 0

    # An unknown role: the whole new set is refused, the old one keeps serving.
    edit(policy, "min_role: VIEWER\n    batch:", "min_role: ADMIN\n    batch:")
    edit(policy, "name: records-trash", "name: trash-renamed")
    await reload()
    assert await viewer_restore() == 200
    trash = await send(http_session, gw, "GET", TRASH + "?limit=1", bearer(creds, "VIEWER"))
    assert trash.status == 200
    samples = gw.metrics()
    assert sample(samples, "gateway_config_reloads_total", result="success") == 1
    assert sample(samples, "gateway_config_reloads_total", result="failure") == 1
    assert sample(samples, "gateway_requests_total", route=TRASH_ROUTE, method="GET", status="200")
    assert not sample(samples, "gateway_requests_total", route="trash-renamed", method="GET",
                     status="200")  # fmt: skip
    failed = gw.events("reload_failed")[0]
    assert any(
        re.fullmatch(rf"{re.escape(str(policy))}:\d+: routes\[0\]\.min_role: .*ADMIN.*", error)
        for error in failed["errors"]
    ), failed
    assert gw.admin("/readyz")[0] == 200

    # Fixed again, plus a new listen port: applied, but the port needs a restart.
    edit(policy, "min_role: ADMIN\n    batch:", "min_role: OWNER\n    batch:")
    new_port = free_port()
    edit(gw.config_path, f'listen: "127.0.0.1:{gw.port}"', f'listen: "127.0.0.1:{new_port}"')
    await reload()
    assert await viewer_restore() == 403  # OWNER now
    reloaded = gw.events("reloaded")[-1]
    assert reloaded["restart_needed_for"] == ["listen"]
    assert refused(new_port)
    await reload()  # and still so at the next reload: the old port is still the one bound
    assert gw.events("reloaded")[-1]["restart_needed_for"] == ["listen"]
    assert await viewer_restore() == 403
    assert sample(gw.metrics(), "gateway_config_reloads_total", result="success") == 3


@pytest.mark.e2e
async def test_a_request_in_flight_finishes_under_the_policy_it_started_with(
    start_gateway: Callable[..., GatewayProc], creds: Creds, sandbox: SandboxProc
) -> None:
    gw = start_gateway()
    ids = sandbox.trash_ids(2)
    body = ids_body(ids)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        f"POST {RESTORE} HTTP/1.1\r\nHost: gw\r\nAuthorization: {creds.bearer('MEMBER')}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        f"\r\n{len(body[:10]):x}\r\n".encode()
        + body[:10]
        + b"\r\n"
    )
    await writer.drain()
    # Identity, route and role are decided before the body is read: once the
    # request shows as in flight it is waiting for the rest of its body.
    await poll(lambda: sample(gw.metrics(), "gateway_in_flight_requests") == 1)

    # The new set would refuse it twice over: OWNER only, at most 1 item.
    edit(
        gw.config_path.parent / "policy.yaml",
        "min_role: MEMBER\n    batch:\n      field: recordIds\n      max_items: 1000",
        "min_role: OWNER\n    batch:\n      field: recordIds\n      max_items: 1",
    )
    gw.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gw.events("reloaded")) == 1)
    rest = body[10:]
    writer.write(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()

    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    results = json.loads(answer.partition(b"\r\n\r\n")[2])["results"]
    assert results == [{"recordId": i, "result": "restored"} for i in ids]
    async with aiohttp.ClientSession() as session:
        after = await send(session, gw, "POST", RESTORE, bearer(creds, "MEMBER"), ids_body(ids))
    assert after.status == 403


@pytest.mark.e2e
async def test_sighup_signs_with_a_rotated_secret_file(
    tmp_path: Path,
    creds: Creds,
    start_sandbox: Callable[..., SandboxProc],
    start_gateway: Callable[..., GatewayProc],
    http_session: aiohttp.ClientSession,
) -> None:
    secret_file = tmp_path / "solapi_api_secret"
    secret_file.write_text(creds.secret + "\n", encoding="utf-8")
    port = free_port()
    upstream = start_sandbox(port=port, secret_file=secret_file)
    gw = start_gateway(upstream.url, secret_file=secret_file)

    async def restore() -> Reply:
        return await send(
            http_session, gw, "POST", RESTORE, bearer(creds, "MEMBER"), ids_body([random_id()])
        )

    assert (await restore()).status == 200
    # Rotation: a new secret in the file, and upstream restarted knowing only it.
    new_secret = secrets.token_urlsafe(24)
    secret_file.write_text(new_secret + "\n", encoding="utf-8")
    upstream.proc.kill()
    rotated = start_sandbox(port=port, secret_file=secret_file)

    before = await restore()  # still signed with the old secret
    assert before.status == 403, before.body
    assert before.json()["errorCode"] == "SignatureDoesNotMatch"
    assert "X-Gateway-Error" not in before.headers  # upstream's answer, passed back

    gw.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gw.events("reloaded")) == 1)
    after = await restore()
    assert after.status == 200, after.body
    assert rotated.log()["accepted"] == 1
    assert new_secret not in gw.proc.stderr_text()


# --- SIGTERM: drain ------------------------------------------------------------------------


async def restores_in_flight(
    gw: GatewayProc, creds: Creds, upstream: SandboxProc, n: int
) -> tuple[list[asyncio.Task[Reply]], list[list[str]], aiohttp.ClientSession]:
    """``n`` restores, each on its own connection, all of them already at upstream."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    batches = [upstream.trash_ids(1) for _ in range(n)]
    tasks = [
        asyncio.create_task(
            send(session, gw, "POST", RESTORE, bearer(creds, "MEMBER"), ids_body(ids))
        )
        for ids in batches
    ]
    await poll(lambda: upstream.count() == n)
    return tasks, batches, session


def assert_all_restored(replies: list[Reply], batches: list[list[str]]) -> None:
    for reply, ids in zip(replies, batches, strict=True):
        assert reply.status == 200, reply.body
        assert reply.json()["results"] == [{"recordId": i, "result": "restored"} for i in ids]


@pytest.mark.e2e
async def test_sigterm_answers_20_requests_in_flight_and_refuses_new_connections(
    creds: Creds,
    start_sandbox: Callable[..., SandboxProc],
    start_gateway: Callable[..., GatewayProc],
) -> None:
    slow = start_sandbox(delay_s=1.5)
    gw = start_gateway(slow.url)  # shutdown_grace_s: 5
    tasks, batches, session = await restores_in_flight(gw, creds, slow, 20)
    try:
        signalled = time.monotonic()
        gw.proc.popen.send_signal(signal.SIGTERM)
        await poll(lambda: gw.admin("/readyz")[0] == 503)  # the admin port still answers
        assert json.loads(gw.admin("/readyz")[1]) == {"status": "draining"}
        assert gw.admin("/healthz")[0] == 200
        assert refused(gw.port)
        for again in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):  # impatience, logrotate
            gw.proc.popen.send_signal(again)
        replies = await asyncio.gather(*tasks)
        answered_s = time.monotonic() - signalled
        assert gw.proc.wait() == 0
        exited_s = time.monotonic() - signalled
    finally:
        await session.close()

    assert_all_restored(replies, batches)
    assert exited_s < 5  # within shutdown_grace_s
    assert answered_s < 1.5 + 1  # each waited for upstream's delay, not for the grace
    names = [e["event"] for e in gw.events()]
    assert names.index("draining") < names.index("stopped") == len(names) - 1
    access = gw.access_lines()
    assert [e["status"] for e in access] == [200] * 20
    print(f"drain: 20 in flight answered {answered_s:.2f}s and exit {exited_s:.2f}s after SIGTERM")


async def test_a_request_that_arrives_while_draining_is_503_shutting_down(
    aiohttp_raw_server: Callable[..., Any], tmp_path: Path, creds: Creds
) -> None:
    # A request reaches the handler after the drain began only when it was
    # already queued on a kept-alive connection: it is told to go elsewhere.
    port, admin_port = free_ports(2)
    path = write_gateway_config(
        tmp_path,
        port=port,
        admin_port=admin_port,
        upstream_url="http://127.0.0.1:9",
        api_key=creds.api_key,
        secret_file=creds.secret_file,
        policy=gateway_policy(creds),
    )
    gateway = Gateway(config.load(str(path)), Metrics())
    server: RawTestServer = await aiohttp_raw_server(gateway.handle)
    gateway.draining = True
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            server.make_url(TRASH), headers={"Authorization": creds.bearer("VIEWER")}
        ) as response,
    ):
        body = await response.json()
        assert response.status == 503
        assert response.headers["X-Gateway-Error"] == "ShuttingDown"
        assert response.headers["Connection"].lower() == "close"
        assert body["errorCode"] == "ShuttingDown"
    samples = samples_of(generate_latest(gateway.metrics.registry))
    # Labelled with the route its method and path match, like every refusal.
    assert sample(samples, "gateway_rejections_total", route=TRASH_ROUTE, code="ShuttingDown") == 1


# --- serve --workers N -----------------------------------------------------------------------


async def restore_many(gw: GatewayProc, creds: Creds, n: int, role: str = "MEMBER") -> list[int]:
    """``n`` restores, 20 at a time, each on a new connection (so the kernel spreads them)."""
    gate = asyncio.Semaphore(20)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with gate:
                headers = bearer(creds, role)
                reply = await send(session, gw, "POST", RESTORE, headers, ids_body([random_id()]))
                return reply.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


def total_requests(gw: GatewayProc) -> float:
    return sum(family(gw.metrics(), "gateway_requests_total").values())


@pytest.mark.e2e
async def test_workers_sum_their_metrics_and_a_killed_worker_is_replaced(
    tmp_path: Path, creds: Creds, start_gateway: Callable[..., GatewayProc]
) -> None:
    metrics_dir = tmp_path / "metrics"
    options: dict[str, Any] = {
        "workers": 2,
        "env": {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        "settings": {"audit_log": "audit.jsonl"},
    }
    gw = start_gateway(**options)
    audit = gw.config_path.parent / "audit.jsonl"
    policy = gw.config_path.parent / "policy.yaml"
    await poll(lambda: len(gw.worker_pids()) == 2)
    first, second = gw.worker_pids()

    assert await restore_many(gw, creds, 200) == [200] * 200
    # Each request is counted and logged just after its answer is relayed.
    await poll(lambda: total_requests(gw) == 200)
    await poll(lambda: len(gw.access_lines()) == 200)
    samples = gw.metrics()
    assert family(samples, "gateway_requests_total") == {
        labelled(route=RESTORE_ROUTE, method="POST", status="200"): 200.0
    }
    assert sample(samples, "gateway_batch_items_count", route=RESTORE_ROUTE) == 200
    assert sample(samples, "gateway_in_flight_requests") == 0
    assert sample(samples, "gateway_build_info", version=__version__) == 1
    assert not any("pid" in dict(labels) for _, labels in samples)
    # Both workers took a share, and each wrote its own access lines to the shared stderr.
    assert {f"counter_{first}.db", f"counter_{second}.db"} <= set(os.listdir(metrics_dir))
    access = gw.access_lines()
    assert len({e["request_id"] for e in access}) == len(access) == 200
    # Both append to one audit file, a whole line at a time.
    await poll(lambda: audit.read_text().count("\n") == 200)
    audited = json_lines(audit.read_text())
    assert {a["request_id"] for a in audited} == {e["request_id"] for e in access}

    os.kill(first, signal.SIGKILL)
    await poll(lambda: len(gw.events("worker_exited")) == 1)
    assert total_requests(gw) == 200  # the dead worker's counts stay in the sum
    await poll(lambda: len(gw.worker_pids()) == 3 and gw.admin("/readyz")[0] == 200)
    replacement = gw.worker_pids()[-1]
    assert replacement not in (first, second)
    assert await restore_many(gw, creds, 50) == [200] * 50
    # A request is counted just after its answer is relayed: give the last one a moment.
    await poll(lambda: total_requests(gw) == 250)

    # SIGHUP to the supervisor: checked and counted once, applied by every worker.
    edit(policy, "min_role: MEMBER\n    batch:", "min_role: VIEWER\n    batch:")
    gw.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gw.events("reloaded")) == 2)
    assert await restore_many(gw, creds, 20, role="VIEWER") == [200] * 20
    samples = gw.metrics()
    assert sample(samples, "gateway_config_reloads_total", result="success") == 1
    assert sample(samples, "gateway_config_reloads_total", result="failure") == 0

    # logrotate, with a broken policy on disk: refused and counted once by the
    # supervisor, the workers keep their set and still reopen the audit file.
    edit(policy, "min_role: VIEWER\n    batch:", "min_role: ADMIN\n    batch:")
    audit.rename(audit.with_name("audit.jsonl.1"))
    gw.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gw.events("reload_failed")) == 1)
    assert await restore_many(gw, creds, 20, role="VIEWER") == [200] * 20
    await poll(lambda: audit.exists() and audit.read_text().count("\n") == 20)
    samples = gw.metrics()
    assert sample(samples, "gateway_config_reloads_total", result="success") == 1
    assert sample(samples, "gateway_config_reloads_total", result="failure") == 1
    assert len(gw.events("reload_failed")) == 1  # not once more per worker

    assert gw.proc.stop(signal.SIGTERM) == 0
    assert all(not pid_alive(pid) for pid in (second, replacement))

    # A new run on the same metrics folder starts from zero: the old files were cleared.
    again = start_gateway(**options)
    assert family(again.metrics(), "gateway_requests_total") == {}
    assert again.proc.stop(signal.SIGTERM) == 0


@pytest.mark.e2e
async def test_workers_drain_even_when_signalled_twice(
    creds: Creds,
    start_sandbox: Callable[..., SandboxProc],
    start_gateway: Callable[..., GatewayProc],
) -> None:
    slow = start_sandbox(delay_s=1.5)
    gw = start_gateway(slow.url, workers=2)
    await poll(lambda: len(gw.worker_pids()) == 2)
    tasks, batches, session = await restores_in_flight(gw, creds, slow, 10)
    try:
        # Ctrl-C in a terminal or systemd's stop signal the whole process group, so
        # a worker already draining on its own SIGINT then gets the supervisor's SIGTERM.
        for pid in gw.worker_pids():
            os.kill(pid, signal.SIGINT)
        await poll(lambda: len(gw.events("draining")) == 2)
        gw.proc.popen.send_signal(signal.SIGTERM)
        await poll(lambda: gw.admin("/readyz")[0] == 503)
        replies = await asyncio.gather(*tasks)
        assert gw.proc.wait() == 0
    finally:
        await session.close()
    assert_all_restored(replies, batches)
    assert len(gw.events("worker_exited")) == 0  # drained, not restarted


@pytest.mark.e2e
async def test_workers_whose_supervisor_is_killed_drain_and_exit(
    start_gateway: Callable[..., GatewayProc],
) -> None:
    gw = start_gateway(workers=2)
    await poll(lambda: len(gw.worker_pids()) == 2)
    workers = gw.worker_pids()
    gw.proc.popen.kill()  # SIGKILL: the supervisor cannot pass anything on
    gw.proc.popen.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    # Each notices within a second and drains (shutdown_grace_s 5 at most).
    await poll(lambda: not any(alive(pid) for pid in workers), timeout_s=20)
    gone = gw.events("supervisor_gone")
    assert sorted(e["pid"] for e in gone) == sorted(workers)
    assert len(gw.events("stopped")) == 2


# --- the audit log ---------------------------------------------------------------------------


@pytest.mark.e2e
async def test_audit_log_names_every_record_of_every_batch_and_reopens_on_sighup(
    tmp_path: Path,
    creds: Creds,
    sandbox: SandboxProc,
    start_gateway: Callable[..., GatewayProc],
    http_session: aiohttp.ClientSession,
) -> None:
    audit = tmp_path / "audit" / "batches.jsonl"
    audit.parent.mkdir()
    gw = start_gateway(settings={"audit_log": str(audit)})
    trusted = {"X-Internal-Principal": "ops-console", "X-Internal-Role": "OWNER"}
    member_ids, owner_ids = sandbox.trash_ids(3), [random_id()]

    async def restore(headers: dict[str, str], ids: list[str], rid: str) -> int:
        headers = {"Content-Type": JSON_TYPE, "X-Request-ID": rid, **headers}
        return (await send(http_session, gw, "POST", RESTORE, headers, ids_body(ids))).status

    member = {"Authorization": creds.bearer("MEMBER")}
    assert await restore(member, member_ids, "audit-1") == 200
    assert await restore(trusted, owner_ids, "audit-2") == 200
    # Not audited: refused before or by the batch check, or not a batch route.
    assert await restore({"Authorization": creds.bearer("VIEWER")}, [random_id()], "no-1") == 403
    assert await restore(member, ["CRMRC-not-an-id"], "no-2") == 400
    trash = await send(http_session, gw, "GET", TRASH, {**member, "X-Request-ID": "no-3"})
    assert trash.status == 200

    def records(path: Path) -> list[dict[str, Any]]:
        return json_lines(path.read_text(encoding="utf-8"))

    await poll(lambda: audit.exists() and len(records(audit)) == 2)
    first, second = records(audit)
    assert first["request_id"] == "audit-1" and first["record_ids"] == member_ids
    assert (first["principal"], first["role"], first["via"]) == ("test-member", "MEMBER", "token")
    assert (first["route"], first["method"], first["path"]) == (RESTORE_ROUTE, "POST", RESTORE)
    assert (first["status"], first["upstream_status"]) == (200, 200)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (second["principal"], second["role"], second["via"]) == (
        "ops-console", "OWNER", "trusted-headers"
    )  # fmt: skip
    assert second["record_ids"] == owner_ids
    # The access log carries the batch size, never the IDs.
    assert not any(i in gw.proc.stderr_text() for i in member_ids)

    # logrotate: move the file away, then SIGHUP; new lines go to a new file.
    rotated = audit.with_name("batches.jsonl.1")
    audit.rename(rotated)
    gw.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gw.events("reloaded")) == 1)
    later_ids = [random_id(), random_id()]
    assert await restore(member, later_ids, "audit-3") == 200
    await poll(lambda: audit.exists() and len(records(audit)) == 1)
    assert [r["request_id"] for r in records(rotated)] == ["audit-1", "audit-2"]
    assert records(audit)[0]["record_ids"] == later_ids

    # Rotated again while the policy on disk is broken: the reload fails, the file
    # is reopened all the same.
    edit(gw.config_path.parent / "policy.yaml", "min_role: MEMBER\n    batch:",
         "min_role: ADMIN\n    batch:")  # fmt: skip
    audit.rename(audit.with_name("batches.jsonl.2"))
    gw.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: len(gw.events("reload_failed")) == 1)
    assert await restore(member, [random_id()], "audit-4") == 200  # the old policy serves
    await poll(lambda: audit.exists() and len(records(audit)) == 1)
    assert records(audit)[0]["request_id"] == "audit-4"

    assert gw.proc.stop(signal.SIGTERM) == 0
    written = "".join(p.read_text(encoding="utf-8") for p in audit.parent.iterdir())
    for secret_value in (creds.secret, *creds.tokens.values()):
        assert secret_value not in written
