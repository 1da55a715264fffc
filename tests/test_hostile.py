"""End to end: a hostile but authenticated caller, against real gateway processes.

One test (or a few) per way a caller could get the gateway and the server behind
it to read one request two ways, or make the gateway misreport what happened:

    parser differentials   a charset other than UTF-8, case variants of a body
                           member, a query parameter nobody listed (``query:`` and
                           ``fields:`` of the shipped policy)
    credentials in logs    a token sent under the wrong scheme, in the log and explain
    a caller hanging up    499 ClientClosedRequest, no 5xx, no traceback
    broken chunking        a bad chunk size after a pause: 400 at once, not 408 later
    Expect: 100-continue   asked for once admitted, never read when refused
    a costly JSON body     more values than the route allows: refused unread
    metrics                a trusted peer cannot book requests to a policy principal
    HTTP versions          HTTP/2.0, HTTP/0.9, no version: 400, answered as HTTP/1.1
    answers                no Server of the gateway's own, no upstream Set-Cookie
    forward_headers        headers that change framing or method: a config error

Every refusal is proven unforwarded with ``sandbox.untouched()``.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import (
    REPO,
    TRUSTED_PRINCIPAL,
    TRUSTED_ROLE,
    Creds,
    GatewayProc,
    Reply,
    SandboxProc,
    parse_response,
    poll,
    random_id,
)

from gateway import cli

pytestmark = pytest.mark.e2e

RESTORE = "/crm-core/v1/records/bulk/restore"
DELETE = "/crm-core/v1/records/bulk/delete"
TRASH = "/crm-core/v1/records/trash"
ALNUM = string.ascii_letters + string.digits


def ids(*items: str, **extra: Any) -> bytes:
    return json.dumps({"recordIds": list(items), **extra}).encode()


def wire(
    method: str,
    target: str,
    *headers: str,
    body: bytes | None = None,
    version: str = " HTTP/1.1",
) -> bytes:
    """One request, byte for byte, closing its connection after the answer."""
    lines = [f"{method} {target}{version}", "Host: gateway.test", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b"")


def assert_refused(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["X-Gateway-Error"] == code
    assert reply.json()["errorCode"] == code


async def access_line(gateway: GatewayProc, request_id: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return [a for a in gateway.access_lines() if a["request_id"] == request_id]

    await poll(lambda: bool(found()))
    return found()[0]


def metric(gateway: GatewayProc, name: str, **labels: str) -> float:
    """One sample's value from the admin port (0 when the series does not exist)."""
    status, text = gateway.admin("/metrics")
    assert status == 200
    total = 0.0
    for line in text.decode().splitlines():
        if not line.startswith(name + "{"):
            continue
        shown = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
        if all(shown.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- #3: one request, one reading: charset, body members, query -----------------------------


async def test_a_utf_7_body_that_spells_permanent_is_415_not_a_member_delete(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # In UTF-7, "+AHA-" is "p": a reader honouring the charset sees "permanent": true.
    body = b'{"recordIds": ["' + random_id().encode() + b'"], "+AHA-ermanent": true}'
    for charset in ("utf-7", "UTF-7", '"utf-7"', "latin-1"):
        request = wire(
            "POST", DELETE, f"Authorization: {creds.bearer('MEMBER')}",
            f"Content-Type: application/json; charset={charset}", body=body,
        )  # fmt: skip
        with sandbox.untouched():
            reply = await shipped_gateway.raw(request)
        assert_refused(reply, 415, "UnsupportedMediaType")


@pytest.mark.parametrize("member", ["Permanent", "PERMANENT", "permanent ", "pErmanent"])
async def test_case_variants_of_permanent_are_refused_for_members_and_owners(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, member: str
) -> None:
    for role in ("MEMBER", "OWNER"):
        request = wire(
            "POST", DELETE, f"Authorization: {creds.bearer(role)}",
            "Content-Type: application/json", body=ids(random_id(), **{member: True}),
        )  # fmt: skip
        with sandbox.untouched():
            reply = await shipped_gateway.raw(request)
        assert_refused(reply, 400, "InvalidBody")
        assert member.encode() not in reply.body  # the caller's key is not echoed


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", DELETE + "?permanent=true", ids(random_id())),
        ("DELETE", f"/crm-core/v1/records/{random_id()}?permanent=true", None),
        ("POST", RESTORE + "?permanent=true", ids(random_id())),
        ("GET", TRASH + "?limit=5&limit=1000", None),
        ("GET", TRASH + "?limit=5&permanent=true", None),
    ],
)
async def test_a_query_parameter_the_route_does_not_list_is_refused(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    method: str,
    target: str,
    body: bytes | None,
) -> None:
    headers = [f"Authorization: {creds.bearer('OWNER')}"]
    if body is not None:
        headers.append("Content-Type: application/json")
    with sandbox.untouched():
        reply = await shipped_gateway.raw(wire(method, target, *headers, body=body))
    assert_refused(reply, 400, "InvalidQuery")
    # The listed parameters still pass.
    reply = await shipped_gateway.raw(
        wire("GET", TRASH + "?limit=2&offset=1", f"Authorization: {creds.bearer('VIEWER')}")
    )
    assert reply.status == 200 and len(reply.json()["records"]) == 2


async def test_several_content_encodings_are_each_checked(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # A route without a batch: its body is not read, only its encoding judged.
    target = f"/crm-core/v1/records/{sandbox.trash_ids(1)[0]}/restore"
    request = wire(
        "POST", target, f"Authorization: {creds.bearer('MEMBER')}",
        "Content-Encoding: identity", "Content-Encoding: gzip", body=b"\x1f\x8b",
    )  # fmt: skip
    with sandbox.untouched():
        reply = await shipped_gateway.raw(request)
    assert_refused(reply, 415, "UnsupportedMediaType")


# --- #4: a credential under the wrong scheme stays out of the log ----------------------------


async def test_a_token_sent_as_an_hmac_header_is_logged_nowhere(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = creds.tokens["OWNER"]
    for header in (
        f"HMAC-SHA256 {token}",
        f"HMAC-SHA256 {token}=1",
        f"HMAC-SHA256 apiKey=NCSX, {token}",
        f"hmac-sha256 date=x, {token}, salt=y",
    ):
        rid = "wrong-scheme-" + secrets.token_hex(4)
        request = wire("GET", TRASH, f"Authorization: {header}", f"X-Request-ID: {rid}")
        with sandbox.untouched():
            reply = await shipped_gateway.raw(request)
        assert_refused(reply, 401, "Unauthorized")
        line = await access_line(shipped_gateway, rid)
        assert line["reason"].startswith("hmac malformed")
        assert not leaks(token, json.dumps(line)), line
        # explain says why too, without the token.
        config = str(shipped_gateway.config_path)
        code = cli.main(["explain", "--config", config, "-H", f"Authorization: {header}",
                         "GET", TRASH])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 1 and "hmac malformed" in out
        assert not leaks(token, out), out
    assert not leaks(token, shipped_gateway.proc.stderr_text())


def leaks(token: str, text: str) -> bool:
    """Any 8 characters of the token's random part in ``text`` (a prefix leaks too)."""
    secret = token.split("_", 2)[2]  # sgw_owner_<random>
    return any(secret[i : i + 8] in text for i in range(len(secret) - 7))


# --- #5: a caller that hangs up mid-body ---------------------------------------------------


async def test_a_caller_that_hangs_up_mid_body_is_499_not_an_internal_error(
    start_gateway: Callable[..., GatewayProc], sandbox: SandboxProc, creds: Creds
) -> None:
    gateway = start_gateway()
    head = wire(
        "POST", RESTORE, f"Authorization: {creds.bearer('MEMBER')}",
        "Content-Type: application/json", "X-Request-ID: hangs-up-1",
    ).replace(b"\r\n\r\n", b"\r\nContent-Length: 5000\r\n\r\n")  # fmt: skip
    with sandbox.untouched():
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(head + b'{"recordIds": ["CRMRC')
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler is reading the body by now
        writer.close()
        await writer.wait_closed()
        line = await access_line(gateway, "hangs-up-1")
    assert line["status"] == 499
    assert line["errorCode"] == "ClientClosedRequest"
    assert line["route"] == "records-bulk-restore" and line["principal"] == "test-member"
    logged = gateway.events()
    assert not [e for e in logged if e.get("level") == "error" or "traceback" in e], logged
    labels = {"route": "records-bulk-restore", "method": "POST"}
    assert metric(gateway, "gateway_requests_total", status="499", **labels) == 1
    assert metric(gateway, "gateway_requests_total", status="500", **labels) == 0
    assert metric(gateway, "gateway_rejections_total", code="InternalError") == 0
    # And the gateway serves on.
    reply = await gateway.raw(wire("GET", TRASH, f"Authorization: {creds.bearer('VIEWER')}"))
    assert reply.status == 200


# --- #6: a bad chunk size after a pause ----------------------------------------------------


async def test_a_bad_chunk_after_a_pause_is_400_at_once_not_408_later(
    start_gateway: Callable[..., GatewayProc], sandbox: SandboxProc, creds: Creds
) -> None:
    body_timeout_s = 20.0  # a 408 would come only this late
    gateway = start_gateway(settings={"body_timeout_s": body_timeout_s})
    head = wire(
        "POST", RESTORE, f"Authorization: {creds.bearer('MEMBER')}",
        "Content-Type: application/json", "Transfer-Encoding: chunked",
    )  # fmt: skip
    with sandbox.untouched():
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(head + b'3\r\n{"r\r\n')
            await writer.drain()
            await asyncio.sleep(0.3)  # the gateway is reading the body by now
            started = time.monotonic()
            writer.write(b"zz\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), body_timeout_s / 2)
            elapsed = time.monotonic() - started
        finally:
            writer.close()
    reply = parse_response(data, dechunk=False)
    assert_refused(reply, 400, "InvalidRequest")
    assert reply.headers["Connection"] == "close"
    assert elapsed < body_timeout_s / 2
    line = await access_line(gateway, reply.headers["X-Request-ID"])
    assert line["reason"].startswith("the body's framing broke off")


# --- #7: Expect: 100-continue ---------------------------------------------------------------


def run_curl(*args: str) -> tuple[Reply, dict[str, str]]:
    """curl with ``-w`` reporting what it uploaded; its own timeout is the test's bound."""
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed (.ci/run installs it before the tests)")
    marker = "\n--curl--"
    done = subprocess.run(
        [exe, "-sS", "-i", *args, "-w", marker + " %{size_upload} %{time_total}"],
        capture_output=True,
        timeout=25,  # the expect100-timeout below is 30 s: a missing 100 fails here
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out, _, written = done.stdout.decode("latin-1").rpartition(marker)
    size_upload, time_total = written.split()
    reply = parse_response(out.encode("latin-1"), dechunk=False)
    return reply, {"size_upload": size_upload, "time_total": time_total}


async def test_expect_100_continue_gets_its_100_once_admitted(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, tmp_path: Path
) -> None:
    payload = tmp_path / "1000ids.json"
    payload.write_bytes(ids(*(random_id() for _ in range(1000))))
    common = [
        "--expect100-timeout", "30",  # without a 100, curl would sit on its body 30 s
        "-H", "Expect: 100-continue", "-H", "Content-Type: application/json",
        "--data-binary", f"@{payload}", gateway.url + RESTORE,
    ]  # fmt: skip
    before = sandbox.count()
    reply, sent = run_curl("-H", f"Authorization: {creds.bearer('MEMBER')}", *common)
    assert reply.status == 200, reply.body
    assert reply.json()["requestedCount"] == 1000
    assert int(sent["size_upload"]) == payload.stat().st_size
    assert sandbox.count() == before + 1
    # Refused before the body was asked for: the final answer at once, no body sent.
    with sandbox.untouched():
        reply, sent = run_curl("-H", f"Authorization: {creds.bearer('VIEWER')}", *common)
    assert_refused(reply, 403, "Forbidden")
    assert sent["size_upload"] == "0"


async def test_a_request_refused_before_its_body_is_asked_for_is_never_read(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    head = (
        f"POST {RESTORE} HTTP/1.1\r\nHost: gateway.test\r\n"
        f"Authorization: {creds.bearer('VIEWER')}\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: 50000\r\n\r\n"  # a keep-alive request
    ).encode()
    with sandbox.untouched():
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(head)  # and never a byte of the body
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)  # EOF: the gateway closed
        finally:
            writer.close()
    assert b"100 Continue" not in data
    reply = parse_response(data, dechunk=False)
    assert_refused(reply, 403, "Forbidden")
    assert reply.headers["Connection"] == "close"  # no body will be waited for


# --- #8: a body that would cost the event loop too much -------------------------------------


async def test_a_body_of_more_values_than_the_route_allows_is_refused_unforwarded(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    many = b",".join([b'{"a":1}'] * 5000)  # 40 kB: under the body limit, over 4096 values
    body = b'{"recordIds": ["' + random_id().encode() + b'"], "x": [' + many + b'], "n": "a:b"}'
    request = wire(
        "POST", RESTORE, f"Authorization: {creds.bearer('MEMBER')}",
        "Content-Type: application/json", body=body,
    )  # fmt: skip
    with sandbox.untouched():
        reply = await gateway.raw(request)
    assert_refused(reply, 400, "InvalidJSON")
    assert b"more than 4096 JSON values" in reply.body


# --- #9: a trusted peer names a policy principal --------------------------------------------


async def test_a_name_vouched_for_by_trusted_headers_is_counted_as_other(
    start_gateway: Callable[..., GatewayProc], creds: Creds
) -> None:
    gateway = start_gateway()
    vouched = wire("GET", TRASH, f"{TRUSTED_PRINCIPAL}: test-owner", f"{TRUSTED_ROLE}: OWNER")
    for _ in range(3):
        assert (await gateway.raw(vouched)).status == 200
    by_token = wire("GET", TRASH, f"Authorization: {creds.bearer('OWNER')}")
    assert (await gateway.raw(by_token)).status == 200
    series = "gateway_principal_requests_total"
    await poll(lambda: metric(gateway, series) == 4)
    assert metric(gateway, series, principal="other", route="records-trash") == 3
    assert metric(gateway, series, principal="test-owner", route="records-trash") == 1


# --- #10: HTTP versions other than 1.0 and 1.1 ---------------------------------------------


@pytest.mark.parametrize("version", [" HTTP/2.0", " HTTP/0.9", ""])
async def test_another_http_version_is_400_invalid_request_answered_as_http_1_1(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, version: str
) -> None:
    request = wire("GET", TRASH, f"Authorization: {creds.bearer('VIEWER')}", version=version)
    with sandbox.untouched():
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)  # EOF: connection closed
        finally:
            writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    reply = parse_response(data, dechunk=False)
    assert_refused(reply, 400, "InvalidRequest")
    assert reply.headers["Connection"] == "close"
    line = await access_line(gateway, reply.headers["X-Request-ID"])
    assert (line["status"], line["errorCode"], line["route"]) == (
        400,
        "InvalidRequest",
        "unmatched",
    )


# --- #11: what the gateway adds to and takes from answers ----------------------------------


async def test_no_server_header_of_the_gateways_own_and_no_upstream_cookies(
    start_gateway: Callable[..., GatewayProc],
    aiohttp_server: Any,
    http_session: aiohttp.ClientSession,
    creds: Creds,
) -> None:
    async def trash(request: web.Request) -> web.Response:
        server = request.query.get("server")
        headers = {
            "Set-Cookie": "session=upstream; Path=/",
            **({"Server": server} if server else {}),
        }
        return web.json_response({"records": []}, headers=headers)

    async def no_server(request: web.Request, response: web.StreamResponse) -> None:
        if "server" not in request.query:  # an upstream that names no server at all
            response.headers.popall("Server", None)

    app = web.Application()
    app.router.add_get(TRASH, trash)
    app.on_response_prepare.append(no_server)
    upstream = await aiohttp_server(app)
    gateway = start_gateway(upstream_url=f"http://127.0.0.1:{upstream.port}")
    viewer = {"Authorization": creds.bearer("VIEWER")}

    relayed = await gateway.send(http_session, "GET", TRASH, headers=viewer)
    assert relayed.status == 200 and relayed.json() == {"records": []}
    assert "Server" not in relayed.headers
    assert "Set-Cookie" not in relayed.headers
    # A Server upstream sends is upstream's answer, and passes as it is.
    named = await gateway.send(http_session, "GET", TRASH + "?server=solapi/1", headers=viewer)
    assert named.headers.getall("Server") == ["solapi/1"]
    # The gateway's own answers: a refusal, a request it cannot parse, the admin port.
    refused = await gateway.send(http_session, "GET", TRASH)
    assert refused.status == 401 and "Server" not in refused.headers
    garbled = await gateway.raw(b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert garbled.status == 400 and "Server" not in garbled.headers
    async with http_session.get(gateway.admin_url + "/healthz") as health:
        assert health.status == 200 and "Server" not in health.headers
    async with http_session.get(gateway.admin_url + "/nope") as missing:
        assert missing.status == 404 and "Server" not in missing.headers


# --- #12: forward_headers that would change framing or method -------------------------------


def test_forward_headers_that_change_framing_or_method_are_config_errors(
    tmp_path: Path,
) -> None:
    for name in ("gateway.yaml", "policy.yaml", "api_secret"):
        shutil.copy(REPO / "config" / "demo" / name, tmp_path / name)
    config = tmp_path / "gateway.yaml"
    listed = ["Content-Encoding", "X-HTTP-Method-Override", "Expect", "X-Trace-Id",
              "x-method-override", "Transfer-Encoding", "X-Original-URL"]  # fmt: skip
    text = config.read_text() + "forward_headers:\n" + "".join(f"  - {h}\n" for h in listed)
    config.write_text(text)
    lines = text.splitlines()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("solapi-gateway")), "check-config",
         "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    problems = done.stderr.splitlines()
    refused = [h for h in listed if h != "X-Trace-Id"]
    assert len(problems) == len(refused), problems
    for i, name in enumerate(listed):
        if name == "X-Trace-Id":
            continue
        line = lines.index(f"  - {name}") + 1
        expected = f"{config}:{line}: forward_headers[{i}]: {name} "
        assert any(p.startswith(expected) for p in problems), (expected, problems)
