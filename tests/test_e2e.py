"""End to end: real gateway and sandbox processes, real sockets, aiohttp and curl.

What a user of the gateway checks from the outside: a restore is signed with
the real key and forwarded byte for byte; every refusal is the contract's JSON
error and never reaches upstream (the sandbox's request ``count`` is unchanged);
upstream's own answers come back untouched; secrets stay out of logs and
metrics; the demo and the signals behave. Path tricks are in test_e2e_paths.py.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import (
    Creds,
    DemoProc,
    GatewayProc,
    Reply,
    SandboxProc,
    family,
    ids_body,
    labelled,
    poll,
    random_id,
    sample,
)

from gateway.demo import DEMO_TOKENS

pytestmark = pytest.mark.e2e

RESTORE = "/crm-core/v1/records/bulk/restore"
JSON = "application/json"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
GATEWAY_ERRORS = {
    400: {
        "InvalidPath",
        "InvalidJSON",
        "InvalidBody",
        "BatchEmpty",
        "BatchTooLarge",
        "InvalidItem",
        "DuplicateItems",
    },
    401: {"Unauthorized"},
    403: {"Forbidden"},
    404: {"RouteNotFound"},
    405: {"MethodNotAllowed"},
    413: {"PayloadTooLarge"},
    415: {"UnsupportedMediaType"},
    502: {"UpstreamUnavailable"},
    503: {"ShuttingDown"},
    504: {"UpstreamTimeout"},
}
# What upstream may see: the contract's allow-list plus what the HTTP client sets.
UPSTREAM_HEADERS = {
    "host",
    "content-length",
    "content-type",
    "accept",
    "accept-encoding",
    "accept-language",
    "user-agent",
    "x-request-id",
    "authorization",
}


def auth(creds: Creds, role: str | None, **extra: str) -> dict[str, str]:
    """Headers of a JSON request from a bearer-token caller of ``role`` (None: anonymous).

    ``extra`` adds or replaces headers, ``_`` standing for ``-``: ``X_Request_ID="r1"``.
    """
    headers = {"Content-Type": JSON, **{k.replace("_", "-"): v for k, v in extra.items()}}
    if role is not None:
        headers["Authorization"] = creds.bearer(role)
    return headers


def assert_gateway_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert code in GATEWAY_ERRORS[status]
    assert reply.headers["X-Gateway-Error"] == code
    assert reply.headers["Content-Type"].startswith(JSON)
    assert REQUEST_ID.fullmatch(reply.headers["X-Request-ID"])
    body: dict[str, Any] = reply.json()
    assert body["errorCode"] == code
    assert isinstance(body["errorMessage"], str) and body["errorMessage"]
    return body


def assert_restored(reply: Reply, ids: list[str]) -> None:
    assert reply.status == 200, reply.body
    assert "X-Gateway-Error" not in reply.headers
    answer = reply.json()
    assert answer["requestedCount"] == answer["restoredCount"] == len(ids)
    assert answer["results"] == [{"recordId": i, "result": "restored"} for i in ids]


# --- the happy path: signed, forwarded byte for byte -------------------------------------


async def test_member_restore_is_signed_and_forwarded_byte_for_byte(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    ids = sandbox.trash_ids(2)
    # Odd whitespace, extra fields, 2.50 and 1e3: a re-serialised body would differ.
    body = (
        f'{{ "recordIds" :[ "{ids[0]}",\n\t"{ids[1]}" ] ,"note":"h\u00e9llo \u2713",'
        '  "extra": {"n": [1, 2.50, 1e3], "nested": {}} }  \n'
    ).encode()
    query = "dryRun=false&tag=a%20b&tag=c&empty=&path=/x/../y"
    sandbox.reset()

    reply = await gateway.send(
        http_session,
        "POST",
        f"{RESTORE}?{query}",
        headers=auth(creds, "MEMBER", X_Request_ID="e2e-member.restore_1"),
        data=body,
    )

    assert_restored(reply, ids)
    assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    assert reply.headers["X-Request-ID"] == "e2e-member.restore_1"
    log = sandbox.log()
    assert (log["count"], log["accepted"]) == (1, 1)
    seen = log["requests"][0]
    assert seen["verified"] is True
    assert seen["status"] == 200
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", RESTORE, query)
    assert seen["headers"]["authorization"].startswith(f"HMAC-SHA256 apiKey={creds.api_key}, ")
    assert creds.tokens["MEMBER"] not in json.dumps(seen)
    assert seen["api_key"] == creds.api_key
    assert seen["headers"]["x-request-id"] == "e2e-member.restore_1"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["body_length"] == len(body)


async def test_only_allow_listed_headers_go_upstream(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    sent = {
        "Content-Type": "application/json; charset=utf-8",
        "Accept": "application/json",
        "Accept-Encoding": "identity",
        "Accept-Language": "ko-KR, en;q=0.5",
        "User-Agent": "e2e-agent/1.0",
    }
    dropped = {
        "Authorization": creds.bearer("MEMBER"),
        "Cookie": "session=s3cr3t",
        "X-Internal-Principal": "someone-else",
        "X-Internal-Role": "OWNER",
        "X-Forwarded-For": "10.1.2.3",
        "X-Custom-Trace": "trace-me",
        "X-Api-Key": "nope",
        "Origin": "http://evil.example",
    }
    sandbox.reset()

    reply = await gateway.send(
        http_session, "POST", RESTORE, headers={**sent, **dropped}, data=ids_body([random_id()])
    )

    assert reply.status == 200, reply.body
    seen = sandbox.last()["headers"]
    assert set(seen) == UPSTREAM_HEADERS
    for name, value in sent.items():
        assert seen[name.lower()] == value
    assert seen["host"] == f"127.0.0.1:{sandbox.port}"
    assert seen["x-request-id"] == reply.headers["X-Request-ID"]
    assert seen["authorization"].startswith("HMAC-SHA256 ")


async def test_hop_by_hop_headers_stay_behind(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    body = ids_body([random_id()])
    request = (
        f"POST {RESTORE} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gateway.port}\r\n"
        f"Authorization: {creds.bearer('MEMBER')}\r\n"
        "Content-Type: application/json\r\n"
        "Connection: keep-alive, X-Foo\r\n"
        "X-Foo: bar\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Upgrade: h2c\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body
    # keep-alive was asked for: send a second request that closes, then read to EOF.
    closing = (
        f"GET /nothing-here HTTP/1.1\r\nHost: x\r\nAuthorization: {creds.bearer('MEMBER')}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sandbox.reset()

    reply = await gateway.raw(request + closing)

    assert reply.status == 200, reply.body
    assert sandbox.count() == 1
    seen = sandbox.last()["headers"]
    assert set(seen) <= UPSTREAM_HEADERS
    assert not {"connection", "x-foo", "keep-alive", "te", "trailer", "upgrade"} & set(seen)
    assert not {"proxy-connection", "proxy-authorization"} & set(seen)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (["abc.DEF_123-x"], True),
        (["r" * 128], True),
        (["r" * 129], False),
        (["has space"], False),
        (["slash/not-allowed"], False),
        (['quote"d'], False),
        (["twice-1", "twice-2"], False),
        ([], False),
    ],
    ids=["sane", "128-chars", "129-chars", "space", "slash", "quote", "sent-twice", "absent"],
)
async def test_request_id_is_kept_only_when_sane(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    sent: list[str],
    kept: bool,
) -> None:
    headers = [*auth(creds, "MEMBER").items(), *(("X-Request-ID", v) for v in sent)]
    sandbox.reset()

    reply = await gateway.send(
        http_session, "POST", RESTORE, headers=headers, data=ids_body([random_id()])
    )

    assert reply.status == 200, reply.body
    returned = reply.headers.getall("X-Request-ID")
    assert len(returned) == 1
    if kept:
        assert returned == sent
    else:
        assert REQUEST_ID.fullmatch(returned[0])
        assert returned[0] not in sent
    assert sandbox.last()["headers"]["x-request-id"] == returned[0]


async def test_request_id_comes_back_on_errors_too(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    attempts: list[tuple[str, str, dict[str, str], bytes, int]] = [
        ("POST", RESTORE, auth(creds, None), ids_body([random_id()]), 401),
        ("POST", RESTORE, auth(creds, "VIEWER"), ids_body([random_id()]), 403),
        ("POST", "/crm-core/v1/records", auth(creds, "MEMBER"), b"{}", 404),
        ("GET", RESTORE, auth(creds, "MEMBER"), b"", 405),
        ("POST", RESTORE, auth(creds, "MEMBER"), ids_body([]), 400),
        ("POST", RESTORE, auth(creds, "MEMBER", Content_Type="text/plain"), b"{}", 415),
        ("POST", RESTORE, auth(creds, "MEMBER"), b" " * 70_000, 413),
    ]
    with sandbox.untouched():
        for n, (method, path, headers, body, status) in enumerate(attempts):
            rid = f"error-{n}"
            reply = await gateway.send(
                http_session, method, path, headers={**headers, "X-Request-ID": rid}, data=body
            )
            assert reply.status == status, reply.body
            assert reply.headers["X-Request-ID"] == rid
            assert "X-Gateway-Error" in reply.headers
        bad = await gateway.send(
            http_session, "POST", RESTORE, headers={"X-Request-ID": "bad id!"}, data=b"{}"
        )
    assert bad.status == 401
    assert REQUEST_ID.fullmatch(bad.headers["X-Request-ID"])


# --- upstream's answers pass back unchanged -----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role", "status", "code"),
    [
        ("POST", "/crm-core/v1/records/{random}/restore", "MEMBER", 404, "NotFound"),
        ("GET", "/crm-core/v1/not-in-sandbox", "VIEWER", 404, "NotFound"),
        ("GET", "/crm-core/v1/records/trash?limit=0", "VIEWER", 400, "ValidationError"),
        ("GET", "/crm-core/v1/records/trash?limit=2&offset=1", "VIEWER", 200, None),
    ],
    ids=["unknown-record", "unknown-upstream-path", "bad-query", "trash-page"],
)
async def test_upstream_answers_pass_back_unchanged(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    method: str,
    path: str,
    role: str,
    status: int,
    code: str | None,
) -> None:
    path = path.replace("{random}", random_id())
    sandbox.reset()

    reply = await gateway.send(
        http_session,
        method,
        path,
        headers=auth(creds, role),
        data=b"" if method == "GET" else b"{}",
    )

    assert reply.status == status, reply.body
    assert "X-Gateway-Error" not in reply.headers
    assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    assert REQUEST_ID.fullmatch(reply.headers["X-Request-ID"])
    body = reply.json()
    if code is None:
        assert (body["limit"], body["offset"], len(body["records"])) == (2, 1, 2)
    else:
        assert body["errorCode"] == code
    seen = sandbox.last()
    assert (seen["verified"], seen["status"]) == (True, status)
    assert seen["path"] + ("?" + seen["query"] if seen["query"] else "") == path


async def test_any_upstream_answer_passes_back_minus_hop_by_hop_headers(
    aiohttp_server: Any,
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    broken = gzip.compress(b'{"errorCode": "Boom", "errorMessage": "upstream broke"}')

    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            status=500,
            body=broken,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Set-Cookie": "upstream=1; Path=/",
                "X-Upstream-Custom": "kept",
                "Connection": "X-Upstream-Private",
                "X-Upstream-Private": "dropped",
                "Keep-Alive": "timeout=5",
                "X-Request-ID": "upstream-own-id",
            },
        )

    app = web.Application()
    app.router.add_post(RESTORE, answer)
    upstream = await aiohttp_server(app)
    fronted = start_gateway(upstream_url=f"http://127.0.0.1:{upstream.port}")

    reply = await fronted.send(
        http_session,
        "POST",
        RESTORE,
        headers=auth(creds, "MEMBER", X_Request_ID="pass-back-1"),
        data=ids_body([random_id()]),
    )

    assert reply.status == 500
    assert reply.body == broken  # still gzip: not decompressed, not re-encoded
    assert "X-Gateway-Error" not in reply.headers
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.headers["Content-Type"] == "application/json"
    assert "Set-Cookie" not in reply.headers  # it would stick to the gateway's address
    assert reply.headers["X-Upstream-Custom"] == "kept"
    assert reply.headers.getall("X-Request-ID") == ["pass-back-1"]
    assert "X-Upstream-Private" not in reply.headers
    assert "Keep-Alive" not in reply.headers
    status, metrics = fronted.admin("/metrics")
    assert status == 200
    assert b"gateway_upstream_errors_total{" not in metrics  # a 5xx is an answer


@pytest.mark.parametrize("wrong", ["secret", "api_key"])
async def test_upstream_403_for_bad_credentials_passes_back(
    start_gateway: Callable[..., GatewayProc],
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    wrong: str,
) -> None:
    if wrong == "secret":
        other = tmp_path / "other_secret"
        other.write_text(secrets.token_urlsafe(24), encoding="utf-8")
        misconfigured = start_gateway(secret_file=other)
        code = "SignatureDoesNotMatch"
    else:
        misconfigured = start_gateway(api_key="NCSWRONGKEY00001")
        code = "InvalidAPIKey"
    sandbox.reset()

    reply = await misconfigured.send(
        http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body([random_id()])
    )

    assert reply.status == 403
    assert "X-Gateway-Error" not in reply.headers
    assert reply.json()["errorCode"] == code
    seen = sandbox.last()
    assert (seen["verified"], seen["status"]) == (False, 403)


# --- identity and role ------------------------------------------------------------------


def _identity_cases() -> list[Any]:
    trusted = {"X-Internal-Principal": "ops-console"}

    def case(name: str, headers: dict[str, str], role: str | None, status: int) -> Any:
        return pytest.param(headers, role, status, id=name)

    return [
        case("member-token", {}, "MEMBER", 200),
        case("owner-token", {}, "OWNER", 200),
        case("viewer-token", {}, "VIEWER", 403),
        case("no-identity", {}, None, 401),
        case("unknown-token", {"Authorization": "Bearer sgw_not_a_known_token"}, None, 401),
        case(
            "unknown-token-with-trusted-headers",
            {
                "Authorization": "Bearer sgw_not_a_known_token",
                **trusted,
                "X-Internal-Role": "OWNER",
            },
            None,
            401,
        ),
        case("empty-bearer", {"Authorization": "Bearer "}, None, 401),
        case("basic", {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}, None, 401),
        case("trusted-member", {**trusted, "X-Internal-Role": "MEMBER"}, None, 200),
        case("trusted-owner", {**trusted, "X-Internal-Role": "OWNER"}, None, 200),
        case("trusted-viewer", {**trusted, "X-Internal-Role": "VIEWER"}, None, 403),
        case("trusted-unknown-role", {**trusted, "X-Internal-Role": "ADMIN"}, None, 401),
        case("trusted-lowercase-role", {**trusted, "X-Internal-Role": "member"}, None, 401),
        case("trusted-principal-only", trusted, None, 401),
        case("trusted-role-only", {"X-Internal-Role": "OWNER"}, None, 401),
        case(
            "viewer-token-beats-owner-header",
            {**trusted, "X-Internal-Role": "OWNER"},
            "VIEWER",
            403,
        ),
        case(
            "member-token-beats-viewer-header",
            {**trusted, "X-Internal-Role": "VIEWER"},
            "MEMBER",
            200,
        ),
    ]


@pytest.mark.parametrize(("headers", "role", "status"), _identity_cases())
async def test_identity_and_role(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    headers: dict[str, str],
    role: str | None,
    status: int,
) -> None:
    ids = [random_id()]
    before = sandbox.count()

    reply = await gateway.send(
        http_session, "POST", RESTORE, headers={**auth(creds, role), **headers}, data=ids_body(ids)
    )

    if status == 200:
        assert reply.status == 200, reply.body
        assert reply.json()["results"] == [{"recordId": ids[0], "result": "notFound"}]
        assert sandbox.count() == before + 1
        seen = sandbox.last()["headers"]
        assert "x-internal-principal" not in seen and "x-internal-role" not in seen
        assert seen["authorization"].startswith(f"HMAC-SHA256 apiKey={creds.api_key}, ")
    else:
        code = {401: "Unauthorized", 403: "Forbidden"}[status]
        assert_gateway_error(reply, status, code)
        assert sandbox.count() == before


# --- the order of the walk ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role", "headers", "body", "status", "code"),
    [
        ("POST", RESTORE, None, {"Content-Type": "text/plain"}, b"not json", 401, "Unauthorized"),
        ("POST", "/no/such/path", None, {}, b"{}", 401, "Unauthorized"),
        ("GET", "/metrics", None, {}, b"", 401, "Unauthorized"),
        ("POST", "/no/such/path", "MEMBER", {}, b"not json", 404, "RouteNotFound"),
        ("POST", RESTORE, "VIEWER", {"Content-Type": "text/plain"}, b"not json", 403, "Forbidden"),
        ("POST", RESTORE, "VIEWER", {}, b" " * 70_000, 403, "Forbidden"),
        ("GET", RESTORE, "MEMBER", {}, b"", 405, "MethodNotAllowed"),
        ("DELETE", RESTORE, "VIEWER", {}, b"", 405, "MethodNotAllowed"),
    ],
    ids=[
        "anonymous-bad-body",
        "anonymous-unknown-path",
        "anonymous-metrics-on-proxy-port",
        "member-unknown-path",
        "viewer-bad-body",
        "viewer-huge-body",
        "member-wrong-method",
        "viewer-wrong-method",
    ],
)
async def test_order_of_the_walk(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    method: str,
    path: str,
    role: str | None,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    with sandbox.untouched():
        reply = await gateway.send(
            http_session, method, path, headers={**auth(creds, role), **headers}, data=body
        )
    assert_gateway_error(reply, status, code)
    if status == 405:
        assert reply.headers["Allow"] == "POST"


# --- batch bodies -------------------------------------------------------------------------


async def test_a_batch_of_1000_ids_is_forwarded(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    ids = [random_id() for _ in range(1000)]
    sandbox.reset()

    reply = await gateway.send(
        http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body(ids)
    )

    assert reply.status == 200, reply.body[:300]
    answer = reply.json()
    assert (answer["requestedCount"], answer["failedCount"]) == (1000, 1000)
    assert sandbox.last()["body_sha256"] == hashlib.sha256(ids_body(ids)).hexdigest()


async def test_content_type_is_matched_case_insensitively_with_parameters(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    ids = sandbox.trash_ids(1)
    headers = auth(creds, "MEMBER", Content_Type="Application/JSON; charset=utf-8")

    reply = await gateway.send(http_session, "POST", RESTORE, headers=headers, data=ids_body(ids))

    assert_restored(reply, ids)
    assert sandbox.last()["headers"]["content-type"] == "Application/JSON; charset=utf-8"


def _bad_bodies() -> list[Any]:
    one, two = random_id(), random_id()
    valid = ids_body([one])

    def case(name: str, body: bytes, code: str, status: int = 400, **headers: str) -> Any:
        return pytest.param(body, headers, status, code, id=name)

    return [
        case("1001-ids", ids_body([random_id() for _ in range(1001)]), "BatchTooLarge"),
        case("empty-list", ids_body([]), "BatchEmpty"),
        case("not-json", b"{recordIds: [}", "InvalidJSON"),
        case("empty-body", b"", "InvalidJSON"),
        case(
            "duplicate-keys",
            f'{{"recordIds": ["{one}"], "recordIds": ["{two}"]}}'.encode(),
            "InvalidJSON",
        ),
        case("nan", f'{{"recordIds": ["{one}"], "score": NaN}}'.encode(), "InvalidJSON"),
        case("infinity", f'{{"recordIds": ["{one}"], "score": -Infinity}}'.encode(), "InvalidJSON"),
        case("bom", b"\xef\xbb\xbf" + valid, "InvalidJSON"),
        case(
            "invalid-utf8",
            f'{{"recordIds": ["{one}"], "note": "'.encode() + b'\xff\xfe"}',
            "InvalidJSON",
        ),
        case("top-level-array", json.dumps([one]).encode(), "InvalidBody"),
        case("missing-field", json.dumps({"ids": [one]}).encode(), "InvalidBody"),
        case("field-not-a-list", json.dumps({"recordIds": one}).encode(), "InvalidBody"),
        case("field-null", b'{"recordIds": null}', "InvalidBody"),
        case("non-string-item", ids_body([one, 42]), "InvalidItem"),
        case("bad-pattern", ids_body([one, "CRMRC123"]), "InvalidItem"),
        case("trailing-newline", ids_body([one + "\n"]), "InvalidItem"),
        case("duplicates", ids_body([one, two, one]), "DuplicateItems"),
        case("no-content-type", valid, "UnsupportedMediaType", 415, Content_Type=""),
        case("text-plain", valid, "UnsupportedMediaType", 415, Content_Type="text/plain"),
        case(
            "json-lookalike", valid, "UnsupportedMediaType", 415, Content_Type="application/jsonx"
        ),
        case("gzip", gzip.compress(valid), "UnsupportedMediaType", 415, Content_Encoding="gzip"),
        case(
            "too-large",
            b'{"recordIds": [], "pad": "' + b"x" * 70_000 + b'"}',
            "PayloadTooLarge",
            413,
        ),
    ]


@pytest.mark.parametrize(("body", "headers", "status", "code"), _bad_bodies())
async def test_bad_batches_are_refused_before_upstream(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    sent = auth(creds, "MEMBER", **headers)
    if sent["Content-Type"] == "":
        del sent["Content-Type"]

    with sandbox.untouched():
        reply = await gateway.send(http_session, "POST", RESTORE, headers=sent, data=body)

    assert_gateway_error(reply, status, code)


async def test_offending_items_are_named_by_index(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    good, other = random_id(), random_id()
    with sandbox.untouched():
        invalid = await gateway.send(
            http_session,
            "POST",
            RESTORE,
            headers=auth(creds, "MEMBER"),
            data=ids_body([good, 42, "CRMRC1", other + "\n", None, other]),
        )
        duplicated = await gateway.send(
            http_session,
            "POST",
            RESTORE,
            headers=auth(creds, "MEMBER"),
            data=ids_body([good, other, good, good]),
        )

    details = assert_gateway_error(invalid, 400, "InvalidItem")["details"]
    assert details["indices"] == [1, 2, 3, 4]
    details = assert_gateway_error(duplicated, 400, "DuplicateItems")["details"]
    assert details["indices"] == [2, 3]


async def test_chunked_body_over_the_limit_is_413(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"recordIds": [], "pad": "'
        for _ in range(40):
            yield b"x" * 4096

    with sandbox.untouched():
        reply = await gateway.send(
            http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=chunks()
        )

    assert_gateway_error(reply, 413, "PayloadTooLarge")


async def test_chunked_body_under_the_limit_is_forwarded(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    ids = sandbox.trash_ids(2)
    body = ids_body(ids)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    reply = await gateway.send(
        http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=chunks()
    )

    assert_restored(reply, ids)
    seen = sandbox.last()
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["content-length"] == str(len(body))


# --- curl ---------------------------------------------------------------------------------


async def test_curl_member_restore(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, curl: Callable[..., Reply]
) -> None:
    ids = sandbox.trash_ids(1)
    sandbox.reset()

    reply = curl(
        "-X", "POST", gateway.url + RESTORE,
        "-H", f"Authorization: {creds.bearer('MEMBER')}",
        "-H", "Content-Type: application/json",
        "--data-binary", ids_body(ids).decode(),
    )  # fmt: skip

    assert_restored(reply, ids)
    seen = sandbox.last()
    assert seen["verified"] is True
    assert seen["headers"]["user-agent"].startswith("curl/")
    assert seen["headers"]["x-request-id"] == reply.headers["X-Request-ID"]


async def test_curl_basic_auth_is_401(
    gateway: GatewayProc, sandbox: SandboxProc, curl: Callable[..., Reply]
) -> None:
    with sandbox.untouched():
        reply = curl(
            "-u", "billing-svc:hunter2", "-X", "POST", gateway.url + RESTORE,
            "-H", "Content-Type: application/json",
            "--data-binary", ids_body([random_id()]).decode(),
        )  # fmt: skip
    assert_gateway_error(reply, 401, "Unauthorized")


async def test_curl_chunked_upload_over_the_limit_is_413(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    curl: Callable[..., Reply],
    tmp_path: Path,
) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b'{"recordIds": [], "pad": "' + b"x" * 200_000 + b'"}')
    with sandbox.untouched():
        reply = curl(
            "-X", "POST", gateway.url + RESTORE,
            "-H", f"Authorization: {creds.bearer('MEMBER')}",
            "-H", "Content-Type: application/json",
            "-H", "Transfer-Encoding: chunked",
            "--data-binary", f"@{big}",
        )  # fmt: skip
    assert_gateway_error(reply, 413, "PayloadTooLarge")


# --- upstream failures --------------------------------------------------------------------


async def test_dead_upstream_is_502(
    start_gateway: Callable[..., GatewayProc],
    unused_tcp_port: int,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    stranded = start_gateway(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")

    reply = await stranded.send(
        http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body([random_id()])
    )

    assert_gateway_error(reply, 502, "UpstreamUnavailable")
    samples = stranded.metrics()
    # A refused connection sent nothing, so it is retried: every attempt failed and counts.
    attempts = stranded.access_lines()[-1]["attempts"]
    assert attempts == 3
    assert family(samples, "gateway_upstream_errors_total") == {
        labelled(kind="connect", route="records-bulk-restore"): attempts
    }
    assert family(samples, "gateway_upstream_retries_total") == {
        labelled(reason="connect", route="records-bulk-restore"): attempts - 1
    }


async def test_slow_upstream_is_504_within_the_timeout(
    start_sandbox: Callable[..., SandboxProc],
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    timeout_s, delay_s = 1.0, 30.0  # upstream answers long after the gateway gave up
    slow = start_sandbox(delay_s=delay_s)
    impatient = start_gateway(upstream_url=slow.url, timeout_s=timeout_s, connect_timeout_s=1)
    started = time.monotonic()

    reply = await impatient.send(
        http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body([random_id()])
    )

    elapsed = time.monotonic() - started
    assert_gateway_error(reply, 504, "UpstreamTimeout")
    # At timeout_s, not when upstream would have answered.
    assert timeout_s * 0.9 <= elapsed < (timeout_s + delay_s) / 2
    assert slow.log()["accepted"] == 1  # it did reach upstream, which was too slow


# --- concurrency --------------------------------------------------------------------------


async def test_100_concurrent_restores_are_each_signed_afresh(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    batches = [[*sandbox.trash_ids(1), random_id()] for _ in range(100)]
    sandbox.reset()

    async def restore(ids: list[str]) -> Reply:
        return await gateway.send(
            http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body(ids)
        )

    replies = await asyncio.gather(*(restore(ids) for ids in batches))

    for ids, reply in zip(batches, replies, strict=True):
        assert reply.status == 200, reply.body
        assert [r["result"] for r in reply.json()["results"]] == ["restored", "notFound"]
        assert reply.json()["results"][0]["recordId"] == ids[0]
    log = sandbox.log()
    assert (log["count"], log["accepted"]) == (100, 100)
    assert all(seen["verified"] for seen in log["requests"])
    assert len({seen["salt"] for seen in log["requests"]}) == 100
    assert len({seen["headers"]["x-request-id"] for seen in log["requests"]}) == 100


# --- secrets, logs, metrics ---------------------------------------------------------------


def mixed_traffic(creds: Creds) -> list[tuple[str, str, dict[str, str], bytes, int]]:
    """(method, path, headers, body, expected status): one of nearly every outcome."""
    trusted = {"X-Internal-Principal": "ops-console", "X-Internal-Role": "MEMBER"}
    basic = "Basic " + base64.b64encode(f"svc:{creds.tokens['OWNER']}".encode()).decode()
    stranger = f"Bearer sgw_{secrets.token_urlsafe(24)}"
    return [
        ("POST", RESTORE, auth(creds, "MEMBER"), ids_body([random_id()]), 200),
        ("POST", RESTORE, auth(creds, "OWNER"), ids_body([random_id(), random_id()]), 200),
        ("POST", RESTORE, {**auth(creds, None), **trusted}, ids_body([random_id()]), 200),
        ("POST", RESTORE, auth(creds, "VIEWER"), ids_body([random_id()]), 403),
        ("POST", RESTORE, auth(creds, None, Authorization=stranger), b"{}", 401),
        ("POST", RESTORE, auth(creds, None, Authorization=basic), b"{}", 401),
        ("POST", RESTORE, auth(creds, "MEMBER"), b"[1, 2", 400),
        ("POST", RESTORE, auth(creds, "MEMBER"), b" " * 70_000, 413),
        ("POST", RESTORE, auth(creds, "MEMBER", Content_Type="text/plain"), b"{}", 415),
        ("GET", "/crm-core/v1/records/trash?limit=1", auth(creds, "VIEWER"), b"", 200),
        ("GET", "/metrics", auth(creds, "OWNER"), b"", 404),
        ("PUT", RESTORE, auth(creds, "OWNER"), b"{}", 405),
    ]


async def test_secrets_never_leak_and_every_request_is_logged_once(
    start_gateway: Callable[..., GatewayProc],
    gateway: GatewayProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    own = start_gateway()
    traffic = mixed_traffic(creds)
    replies: list[Reply] = []
    for n, (method, path, headers, body, status) in enumerate(traffic):
        headers = {"X-Request-ID": f"leak-{n}", **headers}
        reply = await own.send(http_session, method, path, headers=headers, data=body)
        assert reply.status == status, (n, reply.body)
        replies.append(reply)
    invalid_id = await own.send(
        http_session,
        "POST",
        RESTORE,
        headers=auth(creds, "MEMBER", X_Request_ID="not valid!"),
        data=ids_body([random_id()]),
    )
    invalid_path = await own.raw(
        f"POST /crm-core/../crm-core/v1/records/bulk/restore HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {creds.bearer('MEMBER')}\r\nConnection: close\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    assert (invalid_id.status, invalid_path.status) == (200, 400)
    replies += [invalid_id, invalid_path]
    # Requests too broken for the HTTP parser, quoting a token in the broken line: a
    # JSON InvalidRequest like any refusal, logged once, the line echoed nowhere.
    for broken in (
        f"GET {RESTORE} HTTP/1.1\r\nAuthorization: {creds.bearer('MEMBER')}\x01\r\n\r\n",
        f"GET {RESTORE} HTTP/1.1\r\nAuthorization: {creds.bearer('OWNER')}{'a' * 9000}\r\n\r\n",
    ):
        reply = await own.raw(broken.encode())
        assert (reply.status, reply.headers["X-Gateway-Error"]) == (400, "InvalidRequest")
        replies.append(reply)
    status, metrics = own.admin("/metrics")
    assert status == 200

    assert own.proc.stop(signal.SIGTERM) == 0
    stderr = own.proc.stderr_text() + gateway.proc.stderr_text()
    secret_values = [creds.secret, *creds.tokens.values()]
    secret_values += [
        h["Authorization"].split()[-1] for _, _, h, _, _ in traffic if "Authorization" in h
    ]
    for value in secret_values:
        assert value not in stderr
        assert value.encode() not in metrics
        for reply in replies:
            assert value.encode() not in reply.body
            assert all(value not in v for v in reply.headers.values())
    events = own.events()  # every line is JSON, or this fails
    assert gateway.events()
    access = [e for e in events if e["event"] == "access"]
    returned_ids = [r.headers["X-Request-ID"] for r in replies]
    assert returned_ids[: len(traffic)] == [f"leak-{n}" for n in range(len(traffic))]
    generated = invalid_id.headers["X-Request-ID"]
    assert REQUEST_ID.fullmatch(generated) and generated != "not valid!"
    assert Counter(e["request_id"] for e in access) == Counter(returned_ids)
    by_id = {e["request_id"]: e for e in access}
    assert [by_id[rid]["status"] for rid in returned_ids] == [r.status for r in replies]
    first = by_id["leak-0"]
    assert (first["route"], first["principal"], first["via"]) == (
        "records-bulk-restore",
        "test-member",
        "token",
    )
    assert by_id["leak-2"]["via"] == "trusted-headers"
    assert by_id["leak-4"]["errorCode"] == "Unauthorized"
    assert {"started", "draining", "stopped"} <= {e["event"] for e in events}


async def test_metrics_count_every_outcome_by_route(
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    own = start_gateway()
    for method, path, headers, body, status in mixed_traffic(creds):
        reply = await own.send(http_session, method, path, headers=headers, data=body)
        assert reply.status == status
    await own.raw(b"POST /a/../b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    samples = own.metrics()
    restore = "records-bulk-restore"
    requests = "gateway_requests_total"
    assert sample(samples, requests, route=restore, method="POST", status="200") == 3
    assert sample(samples, requests, route=restore, method="POST", status="403") == 1
    # "route" is the matched route whatever step the request ended at, 401 included.
    assert sample(samples, requests, route=restore, method="POST", status="401") == 2
    assert sample(samples, requests, route=restore, method="POST", status="400") == 1
    assert sample(samples, requests, route=restore, method="POST", status="413") == 1
    assert sample(samples, requests, route=restore, method="POST", status="415") == 1
    assert sample(samples, requests, route="records-trash", method="GET", status="200") == 1
    assert sample(samples, requests, route="unmatched", method="GET", status="404") == 1
    assert sample(samples, requests, route="unmatched", method="PUT", status="405") == 1
    assert sample(samples, requests, route="unmatched", method="POST", status="400") == 1
    rejections = "gateway_rejections_total"
    assert sample(samples, rejections, route=restore, code="Unauthorized") == 2
    assert sample(samples, rejections, route=restore, code="Forbidden") == 1
    assert sample(samples, rejections, route=restore, code="InvalidJSON") == 1
    assert sample(samples, rejections, route=restore, code="PayloadTooLarge") == 1
    assert sample(samples, rejections, route=restore, code="UnsupportedMediaType") == 1
    assert sample(samples, rejections, route="unmatched", code="RouteNotFound") == 1
    assert sample(samples, rejections, route="unmatched", code="MethodNotAllowed") == 1
    assert sample(samples, rejections, route="unmatched", code="InvalidPath") == 1
    assert sample(samples, "gateway_batch_items_count", route=restore) == 3
    assert sample(samples, "gateway_batch_items_sum", route=restore) == 4
    assert sample(samples, "gateway_upstream_duration_seconds_count", route=restore) == 3
    assert sample(samples, "gateway_in_flight_requests") == 0
    assert not any(name == "gateway_upstream_errors_total" for name, _ in samples)
    assert not any("pid" in dict(labels) for _, labels in samples)


async def test_admin_port(
    gateway: GatewayProc, sandbox: SandboxProc, http_session: aiohttp.ClientSession
) -> None:
    for path, expected in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
        status, body = gateway.admin(path)
        assert (status, json.loads(body)) == (200, expected)
    status, body = gateway.admin("/metrics")
    assert status == 200
    text = body.decode()
    assert "# TYPE gateway_requests_total counter" in text
    assert re.search(r'^gateway_build_info\{version="[^"]+"\} 1\.0$', text, re.M)
    with sandbox.untouched():
        reply = await gateway.send(http_session, "GET", "/metrics")
    assert_gateway_error(reply, 401, "Unauthorized")
    assert b"gateway_requests_total" not in reply.body


# --- the demo and signals -----------------------------------------------------------------


async def test_demo_prints_curl_lines_that_work(
    start_demo: Callable[[], DemoProc], curl: Callable[..., Reply]
) -> None:
    # `curl` is asked for only to skip this test where there is no curl to paste into.
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    demo = start_demo()
    commands = demo.curl_lines()

    member = subprocess.run(["bash", "-c", commands[0]], capture_output=True, text=True, timeout=15)
    viewer_line = next(c for c in commands if DEMO_TOKENS["VIEWER"] in c)
    viewer = subprocess.run(["bash", "-c", viewer_line], capture_output=True, text=True, timeout=15)

    assert DEMO_TOKENS["MEMBER"] in commands[0]
    assert member.stdout.startswith("HTTP/1.1 200"), member.stdout + member.stderr
    assert '"restored"' in member.stdout
    assert viewer.stdout.startswith("HTTP/1.1 403"), viewer.stdout + viewer.stderr
    assert "X-Gateway-Error: Forbidden" in viewer.stdout
    started = time.monotonic()
    assert demo.proc.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 5


async def test_sigterm_drains_and_exits_0(
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    stopping = start_gateway()
    reply = await stopping.send(
        http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body([random_id()])
    )
    assert reply.status == 200  # and the connection stays open in the session's pool

    started = time.monotonic()
    assert stopping.proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 4
    events = [e["event"] for e in stopping.events()]
    assert events[-1] == "stopped"
    assert "draining" in events


# --- trusted headers need a trusted peer ----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "role", "status"),
    [
        ({"X-Internal-Principal": "ops-console", "X-Internal-Role": "OWNER"}, None, 401),
        (
            {
                "X-Internal-Principal": "ops-console",
                "X-Internal-Role": "OWNER",
                "X-Forwarded-For": "127.0.0.1",
                "Forwarded": "for=127.0.0.1",
                "X-Real-IP": "127.0.0.1",
            },
            None,
            401,
        ),
        ({}, "MEMBER", 200),
    ],
    ids=["trusted-headers", "trusted-headers-with-forwarded-for", "bearer-token"],
)
async def test_trusted_headers_from_an_untrusted_peer_are_401(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    headers: dict[str, str],
    role: str | None,
    status: int,
) -> None:
    # 127.0.0.2 is a loopback address too, but not in the policy's 127.0.0.1/32.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as from_elsewhere:
        before = sandbox.count()
        reply = await gateway.send(
            from_elsewhere,
            "POST",
            RESTORE,
            headers={**auth(creds, role), **headers},
            data=ids_body([random_id()]),
        )
    if status == 200:
        assert reply.status == 200, reply.body
        assert sandbox.count() == before + 1
    else:
        assert_gateway_error(reply, 401, "Unauthorized")
        assert sandbox.count() == before


async def test_curl_trusted_headers_only_count_from_a_trusted_peer(
    gateway: GatewayProc, sandbox: SandboxProc, curl: Callable[..., Reply]
) -> None:
    def restore(*extra: str) -> Reply:
        return curl(
            *extra, "-X", "POST", gateway.url + RESTORE,
            "-H", "X-Internal-Principal: ops-console", "-H", "X-Internal-Role: MEMBER",
            "-H", "Content-Type: application/json",
            "--data-binary", ids_body([random_id()]).decode(),
        )  # fmt: skip

    with sandbox.untouched():
        refused = restore("--interface", "127.0.0.2")
    before = sandbox.count()
    trusted = restore()

    assert_gateway_error(refused, 401, "Unauthorized")
    assert trusted.status == 200, trusted.body
    assert sandbox.count() == before + 1


async def test_sigterm_lets_the_request_in_flight_finish(
    start_sandbox: Callable[..., SandboxProc],
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    slow = start_sandbox(delay_s=1)
    draining = start_gateway(upstream_url=slow.url)
    ids = slow.trash_ids(1)
    in_flight = asyncio.create_task(
        draining.send(
            http_session, "POST", RESTORE, headers=auth(creds, "MEMBER"), data=ids_body(ids)
        )
    )
    await poll(lambda: slow.count() == 1)  # it has reached upstream

    draining.proc.popen.send_signal(signal.SIGTERM)
    await poll(lambda: draining.admin("/readyz")[0] == 503)  # the admin port still answers

    assert_restored(await in_flight, ids)
    assert draining.proc.wait() == 0
