"""End to end: request targets a server behind the gateway could read differently.

Every one is 400 ``InvalidPath`` and nothing reaches upstream. The requests are
written byte for byte on a bare socket, or sent with ``curl --path-as-is`` /
``--request-target``, so no client normalises the path on the way. Otherwise
valid (a MEMBER token and a good body), so the path is the only thing wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
import pytest
from support import Creds, GatewayProc, Reply, SandboxProc, ids_body, random_id
from yarl import URL

pytestmark = pytest.mark.e2e

RESTORE = "/crm-core/v1/records/bulk/restore"
BODY = json.dumps({"recordIds": ["CRMRC2026112812345678abcdEFGH123"]}).encode()

TRICKS = {
    "dot-dot": "/crm-core/v1/records/bulk/../bulk/restore",
    "dot": "/./crm-core/v1/records/bulk/restore",
    "dot-dot-at-the-end": "/crm-core/v1/records/bulk/restore/..",
    "encoded-dot-dot": "/crm-core/v1/records/bulk/%2e%2e/bulk/restore",
    "encoded-dot-dot-upper": "/crm-core/v1/records/bulk/%2E%2E/bulk/restore",
    "encoded-slash": "/crm-core/v1/records/bulk%2Frestore",
    "encoded-percent": "/crm-core/v1/records/bulk/restore%25",
    "encoded-letter": "/crm-core/v1/records/bulk/r%65store",
    "encoded-backslash": "/crm-core/v1/records/bulk%5Crestore",
    "backslash": "/crm-core/v1/records/bulk\\restore",
    "double-slash-first": "//crm-core/v1/records/bulk/restore",
    "double-slash-inside": "/crm-core/v1//records/bulk/restore",
    "absolute-form": "http://evil/crm-core/v1/records/bulk/restore",
    "absolute-form-same-host": "http://127.0.0.1/crm-core/v1/records/bulk/restore",
    "fragment": "/crm-core/v1/records/bulk/restore#frag",
    "fragment-after-query": "/crm-core/v1/records/bulk/restore?a=1#frag",
}


def request_bytes(target: str, headers: dict[str, str], body: bytes = BODY) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def member(creds: Creds) -> dict[str, str]:
    return {"Authorization": creds.bearer("MEMBER"), "Content-Type": "application/json"}


def member_restore(creds: Creds) -> list[str]:
    """curl's arguments for a MEMBER's otherwise valid restore; the target is the test's."""
    headers = [arg for name, value in member(creds).items() for arg in ("-H", f"{name}: {value}")]
    return ["-X", "POST", *headers, "--data-binary", BODY.decode()]


def assert_invalid_path(reply: Reply) -> None:
    assert reply.status == 400, reply.body
    assert reply.headers["X-Gateway-Error"] == "InvalidPath"
    assert reply.headers["X-Request-ID"]
    assert reply.json()["errorCode"] == "InvalidPath"
    assert reply.json()["errorMessage"]


@pytest.mark.parametrize("target", TRICKS.values(), ids=TRICKS.keys())
async def test_non_canonical_targets_are_refused(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, target: str
) -> None:
    with sandbox.untouched():
        reply = await gateway.raw(request_bytes(target, member(creds)))
    assert_invalid_path(reply)


async def test_target_is_checked_before_identity(
    gateway: GatewayProc, sandbox: SandboxProc
) -> None:
    with sandbox.untouched():
        reply = await gateway.raw(request_bytes(TRICKS["dot-dot"], {}))
    assert_invalid_path(reply)


@pytest.mark.parametrize(
    "target",
    [
        RESTORE + "/",
        "/CRM-CORE/v1/records/bulk/restore",
        "/crm-core/v1/records/bulk/Restore",
        RESTORE + ";jsessionid=1",
        "/crm-core/v1/records;x=1/bulk/restore",
    ],
    ids=["trailing-slash", "upper-case", "upper-case-last", "params", "params-inside"],
)
async def test_near_misses_are_simply_other_paths(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, target: str
) -> None:
    with sandbox.untouched():
        reply = await gateway.raw(request_bytes(target, member(creds)))
    assert reply.status == 404, reply.body
    assert reply.headers["X-Gateway-Error"] == "RouteNotFound"


async def test_the_query_is_forwarded_unchanged_even_when_odd(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # The canonical-target rule is for the path: %, .., // and \ in a query pass as they are.
    query = "next=/a/../b//c&enc=%2F%25%5C&back=a\\b&dup=1&dup=2&plus=a+b&="
    body = ids_body([random_id()])
    sandbox.reset()

    reply = await gateway.raw(request_bytes(f"{RESTORE}?{query}", member(creds), body))

    assert reply.status == 200, reply.body
    seen = sandbox.last()
    assert (seen["path"], seen["query"], seen["verified"]) == (RESTORE, query, True)


async def test_aiohttp_cannot_sneak_a_dot_segment_through(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, http_session: aiohttp.ClientSession
) -> None:
    # yarl would normalise "/bulk/../bulk/restore" client-side; encoded=True keeps it.
    url = URL(gateway.url + TRICKS["dot-dot"], encoded=True)
    with sandbox.untouched():
        async with http_session.post(url, headers=member(creds), data=BODY) as response:
            status, code = response.status, response.headers.get("X-Gateway-Error")
    assert (status, code) == (400, "InvalidPath")


@pytest.mark.parametrize(
    "target",
    [
        TRICKS["dot-dot"],
        TRICKS["dot"],
        TRICKS["encoded-dot-dot"],
        TRICKS["encoded-slash"],
        TRICKS["encoded-percent"],
        TRICKS["double-slash-first"],
    ],
    ids=["dot-dot", "dot", "encoded-dot-dot", "encoded-slash", "encoded-percent", "double-slash"],
)
async def test_curl_path_as_is(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    curl: Callable[..., Reply],
    target: str,
) -> None:
    with sandbox.untouched():
        reply = curl(*member_restore(creds), "--path-as-is", gateway.url + target)
    assert_invalid_path(reply)


@pytest.mark.parametrize(
    "target",
    [TRICKS["absolute-form"], TRICKS["fragment"], TRICKS["backslash"]],
    ids=["absolute-form", "fragment", "backslash"],
)
async def test_curl_request_target(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    curl: Callable[..., Reply],
    target: str,
) -> None:
    with sandbox.untouched():
        reply = curl(*member_restore(creds), "--request-target", target, gateway.url)
    assert_invalid_path(reply)
