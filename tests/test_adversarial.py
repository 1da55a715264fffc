"""End to end: hostile input against a real gateway process.

Every case is written byte for byte on a bare socket (from 127.0.0.2 where the
peer must be untrusted) and must end one of two ways: the gateway's JSON error
(status, ``X-Gateway-Error`` equal to the body's ``errorCode``) or a closed
connection. Never a request upstream (``sandbox.untouched()``), and never a
gateway that stops serving: after each case a valid restore still gets 200 and
``/healthz`` 200.

    path confusion     overlong UTF-8, %u, half-encoded dots, %00, authority-form,
                       CONNECT, OPTIONS *, raw non-ASCII, NUL and controls in the target
    framing            Host twice or missing; CR, LF, NUL in a value; over-long line,
                       header, too many headers; Transfer-Encoding smuggling; a
                       request hidden in a refused one's body; a chunked body without end
    bodies             100 000 levels of nesting, huge numbers, keys duplicated through
                       escapes, encodings other than UTF-8, two documents in one body
    identity           trusted headers in other letter cases, repeated, from 127.0.0.2;
                       tokens of 5 kB and 100 kB, echoed and logged nowhere
    slow and idle      trickled headers and bodies, 50 slow clients beside normal
                       traffic, a caller that never reads, 2000 idle connections

The cases test_e2e.py and test_e2e_paths.py already hold (``..``, ``%2e%2e``,
``%2F``, ``%5C``, ``//``, absolute-form, fragments, NaN, a BOM, plain duplicate
keys, a chunked body over the limit through aiohttp, trusted headers from
127.0.0.2) are not repeated here.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import (
    Creds,
    GatewayProc,
    Reply,
    SandboxProc,
    ids_body,
    launch_gateway,
    parse_response,
    poll,
    random_id,
    sample,
)

pytestmark = pytest.mark.e2e

RESTORE = "/crm-core/v1/records/bulk/restore"
TRASH = "/crm-core/v1/records/trash"
TRUSTED = "127.0.0.1"  # the test policy's trusted_headers.sources is 127.0.0.1/32
UNTRUSTED = "127.0.0.2"  # loopback too, but not trusted
# The hardened gateway: tight timers, and room for 100 000 levels of nesting.
KEEPALIVE_S = 1.0
BODY_TIMEOUT_S = 1.0
LINGER_S = 2.0  # how long aiohttp drains an unread body after a refusal (gateway/service.py)
# A slow client keeps on this long unless cut off: far beyond every timer above, so
# that being cut off by one of them is not a matter of a few tenths of a second.
TRICKLE_S = 20.0
HARDENED = {
    "keepalive_timeout_s": KEEPALIVE_S,
    "body_timeout_s": BODY_TIMEOUT_S,
    "max_body_bytes": 1_048_576,
}
IDLE_CONNECTIONS = 2000
MIB = 1024 * 1024


def fresh_token() -> str:
    """A token no policy knows: if it shows up anywhere, this test put it there."""
    return f"sgw_hostile_{secrets.token_urlsafe(24)}"


def request(
    target: bytes = RESTORE.encode(),
    *,
    method: bytes = b"POST",
    version: bytes = b"HTTP/1.1",
    headers: list[bytes] | None = None,
    authorization: bytes | None = None,
    body: bytes | None = None,
    close: bool = True,
    host: bool = True,
) -> bytes:
    """One request's bytes, as written; ``headers`` are whole lines without CRLF."""
    lines = [method + b" " + target + b" " + version]
    if host:
        lines.append(b"Host: gateway.test")
    if close:
        lines.append(b"Connection: close")
    if authorization is not None:
        lines.append(b"Authorization: " + authorization)
    lines += headers or []
    if body is not None:
        lines += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return b"\r\n".join([*lines, b"", b""]) + (body or b"")


def member(creds: Creds) -> bytes:
    return creds.bearer("MEMBER").encode()


@dataclass(frozen=True)
class Exchange:
    """What came back on one connection, read until the gateway closed it."""

    data: bytes
    seconds: float  # from the first byte written to EOF

    @property
    def reply(self) -> Reply:
        assert self.data, "the gateway closed the connection without an answer"
        return parse_response(self.data, dechunk=True)

    def replies(self) -> list[int]:
        """The status of every response on the connection, in order (each has a length)."""
        statuses, rest = [], self.data
        while rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            reply = parse_response(head + b"\r\n\r\n", dechunk=False)
            statuses.append(reply.status)
            rest = rest[int(reply.headers.get("Content-Length", "0")) :]
        return statuses


async def connect(port: int, bind: str = TRUSTED) -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(bind, 0))


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 10) -> bytes:
    """One whole response (the gateway's own answers carry a Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = parse_response(head, dechunk=False).headers.get("Content-Length", "0")
    return head + await asyncio.wait_for(reader.readexactly(int(length)), 10)


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Wait for the gateway to close the connection (a reset counts)."""
    try:
        while await asyncio.wait_for(reader.read(65536), 10):
            pass
    except ConnectionError:
        pass


async def exchange(gw: GatewayProc, data: bytes, *, bind: str = TRUSTED) -> Exchange:
    """Write ``data`` on a new connection and read until the gateway closes it."""
    reader, writer = await connect(gw.port, bind)
    started = time.monotonic()
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return Exchange(received, time.monotonic() - started)


async def assert_still_serving(gw: GatewayProc, creds: Creds) -> None:
    """A valid restore is forwarded and answered 200; /healthz is 200."""
    record = random_id()
    # A new connection each time: a kept-alive one might meet the gateway's idle timer.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        reply = await gw.send(
            session,
            "POST",
            RESTORE,
            headers={"Authorization": creds.bearer("MEMBER"), "Content-Type": "application/json"},
            data=ids_body([record]),
        )
    assert reply.status == 200, reply.body
    assert reply.json()["results"] == [{"recordId": record, "result": "notFound"}]
    assert gw.admin("/healthz")[0] == 200


async def attack(
    gw: GatewayProc, sandbox: SandboxProc, creds: Creds, data: bytes, *, bind: str = TRUSTED
) -> Exchange:
    """``exchange``, proving nothing reached upstream and the gateway serves on."""
    with sandbox.untouched():
        result = await exchange(gw, data, bind=bind)
    await assert_still_serving(gw, creds)
    return result


def assert_refused(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["X-Gateway-Error"] == code
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["X-Request-ID"]
    body = reply.json()
    assert body["errorCode"] == code
    assert isinstance(body["errorMessage"], str) and body["errorMessage"]


async def access_line(gw: GatewayProc, request_id: str) -> dict[str, Any]:
    """The access-log line of one request (written just after its answer)."""
    await poll(lambda: any(e["request_id"] == request_id for e in gw.access_lines()))
    return next(e for e in gw.access_lines() if e["request_id"] == request_id)


async def assert_never_echoed_or_logged(
    gw: GatewayProc, result: Exchange, secret: str
) -> dict[str, Any]:
    """No piece of ``secret`` is in the answer or the gateway's stderr; returns the access line."""
    line = await access_line(gw, result.reply.headers["X-Request-ID"])
    stderr = gw.proc.stderr_text()
    for piece in (secret[:40], secret[len(secret) // 2 :][:40], secret[-40:]):
        assert piece.encode() not in result.data
        assert piece not in stderr
    return line


@pytest.fixture(scope="module")
def hardened(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds, sandbox: SandboxProc
) -> Iterator[GatewayProc]:
    """A gateway with keepalive_timeout_s and body_timeout_s of 1 s and a 1 MiB body limit."""
    started = launch_gateway(
        tmp_path_factory.mktemp("hardened"), creds, sandbox.url, settings=HARDENED
    )
    yield started
    started.proc.kill()


# --- path confusion -------------------------------------------------------------------------

BULK = b"/crm-core/v1/records/bulk"
PATH_TRICKS = {
    # name: (method, target, what the gateway answers)
    "overlong-utf8-dot-dot": (b"POST", BULK + b"/%c0%ae%c0%ae/bulk/restore", "InvalidPath"),
    "overlong-utf8-slash": (b"POST", BULK + b"%c0%afrestore", "InvalidPath"),
    "iis-unicode-dot-dot": (b"POST", BULK + b"/%u002e%u002e/bulk/restore", "InvalidPath"),
    "half-encoded-dot-dot": (b"POST", BULK + b"/.%2e/bulk/restore", "InvalidPath"),
    "half-encoded-dot-dot-2": (b"POST", BULK + b"/%2e./bulk/restore", "InvalidPath"),
    "double-encoded-dot-dot": (b"POST", BULK + b"/%252e%252e/bulk/restore", "InvalidPath"),
    "encoded-nul": (b"POST", BULK + b"/restore%00.json", "InvalidPath"),
    "encoded-crlf": (b"POST", BULK + b"/restore%0d%0aX-Internal-Role:%20OWNER", "InvalidPath"),
    "encoded-fragment": (b"POST", BULK + b"/restore%23x", "InvalidPath"),
    "authority-form": (b"POST", b"127.0.0.1:8080", "InvalidPath"),
    "absolute-form-userinfo": (b"POST", b"http://u:p@host" + BULK + b"/restore", "InvalidPath"),
    "connect-authority": (b"CONNECT", b"api.solapi.com:443", "InvalidPath"),
    "options-asterisk": (b"OPTIONS", b"*", "InvalidPath"),
    "post-asterisk": (b"POST", b"*", "InvalidPath"),
    "raw-utf8": (b"POST", BULK + "/réstore".encode(), "InvalidPath"),
    "raw-latin1": (b"POST", BULK + b"/r\xe9store", "InvalidPath"),
    "raw-overlong-utf8": (b"POST", BULK + b"/\xc0\xae\xc0\xae/restore", "InvalidPath"),
    "raw-nul-at-end": (b"POST", BULK + b"/restore\x00", "InvalidPath"),
    "raw-nul-inside": (b"POST", b"/crm-core/v1/rec\x00ords/bulk/restore", "InvalidPath"),
    "raw-tab": (b"POST", BULK + b"/\trestore", "InvalidPath"),
    "raw-del": (b"POST", BULK + b"/\x7frestore", "InvalidPath"),
    "raw-space": (b"POST", BULK + b"/ restore", "InvalidRequest"),
}  # fmt: skip


@pytest.mark.parametrize(("method", "target", "code"), PATH_TRICKS.values(), ids=PATH_TRICKS)
async def test_confusing_targets_are_refused(
    gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    method: bytes,
    target: bytes,
    code: str,
) -> None:
    body = ids_body([random_id()])  # otherwise valid: the target is the only thing wrong
    result = await attack(
        gateway,
        sandbox,
        creds,
        request(target, method=method, authorization=member(creds), body=body),
    )
    assert code in ("InvalidPath", "InvalidRequest")
    assert_refused(result.reply, 400, code)
    assert result.replies() == [400]


# --- framing: what the HTTP parser sees -----------------------------------------------------


async def test_a_refused_request_closes_its_connection_itself(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # No "Connection: close" here: the gateway closes it (its keep-alive is 75 s).
    result = await attack(
        gateway, sandbox, creds, request(close=False, host=False, body=ids_body([random_id()]))
    )
    assert_refused(result.reply, 400, "InvalidRequest")
    assert result.seconds < 5


FRAMING = {
    "two-host-headers": request(headers=[b"Host: evil.test"]),
    "two-host-headers-other-case": request(headers=[b"host: gateway.test"]),
    "two-host-headers-http-1.0": request(version=b"HTTP/1.0", headers=[b"Host: evil.test"]),
    "no-host-on-http-1.1": request(host=False),
    "request-line-over-8190-bytes": request(b"/" + b"a" * 8191),
    "header-over-8190-bytes": request(headers=[b"X-Padding: " + b"a" * 8191]),
    "129-headers": request(headers=[b"X-H%d: v" % n for n in range(127)]),
    "1000-headers": request(headers=[b"X-H%d: v" % n for n in range(1000)]),
    "space-before-colon": request(headers=[b"X-Internal-Role : OWNER"]),
    "header-without-colon": request(headers=[b"X-Internal-Role"]),
    "non-ascii-header-name": request(headers=[b"X-R\xf4le: OWNER"]),
    "obsolete-line-folding": request(headers=[b"X-Internal-Note: a", b" b"]),
    "bare-lf-line-ends": request().replace(b"\r\n", b"\n"),
    "lowercase-method": request(method=b"post"),
    "method-with-symbol": request(method=b"P@ST"),
    "http-9.9": request(version=b"HTTP/9.9"),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("data", FRAMING.values(), ids=FRAMING)
async def test_requests_the_parser_refuses_are_json_invalid_request(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, data: bytes
) -> None:
    result = await attack(gateway, sandbox, creds, data)
    assert_refused(result.reply, 400, "InvalidRequest")
    assert result.replies() == [400]


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer {token}\rX-Internal-Role: OWNER",
        b"Authorization: Bearer {token}\nX-Internal-Role: OWNER",
        b"Authorization: Bearer {token}\x00",
        b"X-Note: {token}\rx",
        b"X-Note: \n{token}",
        b"X-Note: a\x00{token}",
    ],
    ids=["cr-in-authorization", "lf-in-authorization", "nul-in-authorization",
         "cr-in-other", "lf-in-other", "nul-in-other"],
)  # fmt: skip
async def test_cr_lf_nul_in_a_header_value_are_refused_unechoed_and_unlogged(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, header: bytes
) -> None:
    token = fresh_token()
    data = request(
        close=False, headers=[header.replace(b"{token}", token.encode())], body=b'{"recordIds":[]}'
    )
    result = await attack(gateway, sandbox, creds, data)

    assert_refused(result.reply, 400, "InvalidRequest")
    assert result.seconds < 5  # closed by the gateway, not by its 75 s idle timer
    line = await assert_never_echoed_or_logged(gateway, result, token)
    assert (line["status"], line["errorCode"], line["path"]) == (400, "InvalidRequest", "")


def _smuggling() -> dict[str, bytes]:
    body = ids_body([random_id()])
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)

    def framed(*headers: bytes, payload: bytes = chunked, version: bytes = b"HTTP/1.1") -> bytes:
        lines = [b"POST " + RESTORE.encode() + b" " + version, b"Host: gateway.test"]
        lines += [b"Content-Type: application/json", *headers]
        return b"\r\n".join([*lines, b"", b""]) + payload

    return {
        "chunked-and-content-length": framed(
            b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body)
        ),
        "content-length-and-chunked": framed(b"Content-Length: 4", b"Transfer-Encoding: chunked"),
        "two-content-lengths": framed(
            b"Content-Length: %d" % len(body), b"Content-Length: 4", payload=body
        ),
        "content-length-list": framed(
            b"Content-Length: %d, %d" % (len(body), len(body)), payload=body
        ),
        "content-length-signed": framed(b"Content-Length: +%d" % len(body), payload=body),
        "content-length-negative": framed(b"Content-Length: -1", payload=body),
        "content-length-hex": framed(b"Content-Length: 0x%x" % len(body), payload=body),
        "content-length-overflow": framed(b"Content-Length: 1" + b"0" * 30, payload=body),
        "xchunked": framed(b"Transfer-Encoding: xchunked"),
        "chunked-suffix": framed(b"Transfer-Encoding: chunked-x"),
        "space-before-the-name": framed(b" Transfer-Encoding: chunked"),
        "space-before-the-colon": framed(b"Transfer-Encoding : chunked"),
        "vertical-tab-before-the-value": framed(b"Transfer-Encoding:\x0bchunked"),
        "two-te-headers": framed(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        "identity-then-chunked": framed(
            b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"
        ),
        "chunked-listed-twice": framed(b"Transfer-Encoding: chunked, chunked"),
        "chunked-then-gzip": framed(b"Transfer-Encoding: chunked, gzip", payload=body),
        "gzip-then-chunked": framed(b"Transfer-Encoding: gzip, chunked"),
        "te-on-http-1.0": framed(b"Transfer-Encoding: chunked", version=b"HTTP/1.0"),
        "bad-chunk-size": framed(b"Transfer-Encoding: chunked", payload=b"zz\r\n" + chunked),
        "chunk-size-overflow": framed(
            b"Transfer-Encoding: chunked", payload=b"f" * 20 + b"\r\n" + chunked
        ),
        "bare-lf-in-chunks": framed(
            b"Transfer-Encoding: chunked", payload=chunked.replace(b"\r\n", b"\n")
        ),
    }


SMUGGLING = _smuggling()


@pytest.mark.parametrize("data", SMUGGLING.values(), ids=SMUGGLING)
async def test_ambiguous_body_framing_is_refused(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, data: bytes
) -> None:
    # Each would be a valid MEMBER restore if its framing were read one particular way.
    data = data.replace(
        b"Host: gateway.test", b"Host: gateway.test\r\nAuthorization: %s" % member(creds)
    )
    result = await attack(gateway, sandbox, creds, data)
    assert_refused(result.reply, 400, "InvalidRequest")
    assert result.replies() == [400]
    assert result.seconds < 5


async def test_leading_whitespace_in_the_te_value_is_plain_chunked(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # The parser strips the whitespace around a value (RFC 9110 §5.5): "  chunked" is
    # chunked, read once by the gateway and forwarded with a Content-Length of its own.
    record = random_id()
    body = ids_body([record])
    head = request(
        authorization=member(creds),
        headers=[b"Content-Type: application/json", b"Transfer-Encoding: \t chunked"],
    )
    data = head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    sandbox.reset()

    result = await exchange(gateway, data)

    assert result.reply.status == 200, result.reply.body
    seen = sandbox.last()
    assert seen["body_length"] == len(body)
    assert "transfer-encoding" not in seen["headers"]


async def test_a_request_hidden_in_a_refused_requests_body_never_runs(
    hardened: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # An anonymous request (401, its body never read) whose body is a MEMBER's request,
    # then a real request on the same connection: the hidden one must not be answered.
    hidden = request(authorization=member(creds), close=False, body=ids_body([random_id()]))
    outer = request(close=False, body=hidden)
    record = random_id()
    after = request(authorization=member(creds), body=ids_body([record]))

    before = sandbox.count()
    result = await exchange(hardened, outer + after)

    assert result.replies() == [401, 200]
    assert sandbox.count() == before + 1  # the request after it, and only that one
    assert sandbox.last()["body_sha256"] == hashlib.sha256(ids_body([record])).hexdigest()
    await assert_still_serving(hardened, creds)


async def test_a_chunked_body_that_never_ends_is_413_at_the_limit(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    head = request(authorization=member(creds), close=False)
    head = head.replace(
        b"\r\n\r\n", b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"  # whitespace: valid JSON padding, for ever
    sent = 0
    with sandbox.untouched():
        reader, writer = await connect(gateway.port)
        answer = asyncio.create_task(read_answer(reader))
        try:
            writer.write(head)
            while not answer.done() and sent < 32 * MIB:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                await asyncio.sleep(0)  # let the answer in, if there is one
        except ConnectionError:  # the gateway may hang up while we still write
            pass
        try:
            data = await answer
        finally:
            writer.close()

    reply = parse_response(data, dechunk=False)
    assert_refused(reply, 413, "PayloadTooLarge")
    assert reply.headers["Connection"] == "close"
    # Answered once 64 KiB were in; what was sent beyond sat in socket buffers on the way.
    assert sent < 8 * MIB
    await assert_still_serving(gateway, creds)


# --- bodies -----------------------------------------------------------------------------------


def _hostile_bodies() -> dict[str, bytes]:
    one = random_id()
    start = b'{"recordIds": ["' + one.encode() + b'"], '
    other = random_id().encode()
    deep = 100_000
    return {
        "arrays-nested-100000-deep": start + b'"x": ' + b"[" * deep + b"]" * deep + b"}",
        "objects-nested-100000-deep": start + b'"x": ' + b'{"a":' * deep + b"1" + b"}" * (deep + 1),
        "unclosed-nesting": start + b'"x": ' + b"[" * deep,
        "exponent-overflow": start + b'"x": 1e999999}',
        "negative-exponent-overflow": start + b'"x": -1e999999}',
        "integer-of-10000-digits": start + b'"x": ' + b"9" * 10_000 + b"}",
        "duplicate-key-through-escape": start + b'"recordI\\u0064s": ["' + other + b'"]}',
        "duplicate-key-nested": start + b'"x": {"a": 1, "a": 2}}',
        "overlong-utf8": start + b'"x": "\xc0\xae"}',
        "utf8-encoded-surrogate": start + b'"x": "\xed\xa0\x80"}',
        "utf16": ('{"recordIds": ["' + one + '"]}').encode("utf-16"),
        "raw-nul-in-a-string": start + b'"x": "a\x00b"}',
        "trailing-garbage": ids_body([one]) + b" x",
        "two-documents": ids_body([one]) + ids_body([random_id()]),
    }  # fmt: skip


HOSTILE_BODIES = _hostile_bodies()


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES)
async def test_hostile_json_is_invalid_json(
    hardened: GatewayProc, sandbox: SandboxProc, creds: Creds, body: bytes
) -> None:
    assert len(body) <= HARDENED["max_body_bytes"]
    result = await attack(hardened, sandbox, creds, request(authorization=member(creds), body=body))
    assert_refused(result.reply, 400, "InvalidJSON")
    assert result.seconds < 5  # nesting and big numbers are refused fast, not computed


# --- identity ---------------------------------------------------------------------------------

PRINCIPAL = b"X-Internal-Principal: ops-console"


def role(value: bytes) -> bytes:
    return b"X-Internal-Role: " + value


IDENTITY_TRICKS = {
    # name: (peer, identity header lines)
    "lowercase-names-from-untrusted": (UNTRUSTED, [PRINCIPAL.lower(), role(b"OWNER").lower()]),
    "uppercase-names-from-untrusted": (UNTRUSTED, [PRINCIPAL.upper(), role(b"OWNER").upper()]),
    "repeated-role-from-untrusted": (UNTRUSTED, [PRINCIPAL, role(b"OWNER"), role(b"OWNER")]),
    "unknown-role-from-untrusted": (UNTRUSTED, [PRINCIPAL, role(b"ROOT")]),
    "lowercase-role-from-untrusted": (UNTRUSTED, [PRINCIPAL, role(b"owner")]),
    "repeated-role-from-trusted": (TRUSTED, [PRINCIPAL, role(b"VIEWER"), role(b"OWNER").lower()]),
    "same-role-twice-from-trusted": (TRUSTED, [PRINCIPAL, role(b"MEMBER"), role(b"MEMBER")]),
    "repeated-principal-from-trusted": (TRUSTED, [PRINCIPAL, PRINCIPAL + b"2", role(b"MEMBER")]),
    "role-list-from-trusted": (TRUSTED, [PRINCIPAL, role(b"VIEWER, OWNER")]),
    "lowercase-role-from-trusted": (TRUSTED, [PRINCIPAL, role(b"member")]),
    "role-with-escape-text-from-trusted": (TRUSTED, [PRINCIPAL, role(b"OWNER\\x00")]),
    "underscores-from-trusted": (TRUSTED, [b"X_Internal_Principal: a", b"X_Internal_Role: OWNER"]),
    "principal-with-a-space-from-trusted": (TRUSTED, [PRINCIPAL + b" x", role(b"OWNER")]),
}  # fmt: skip


@pytest.mark.parametrize(("peer", "lines"), IDENTITY_TRICKS.values(), ids=IDENTITY_TRICKS)
async def test_forged_or_garbled_identity_headers_are_401(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, peer: str, lines: list[bytes]
) -> None:
    data = request(headers=lines, body=ids_body([random_id()]))
    result = await attack(gateway, sandbox, creds, data, bind=peer)
    assert_refused(result.reply, 401, "Unauthorized")


async def test_identity_header_names_are_case_insensitive_from_a_trusted_peer(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    # The control for the cases above: the same lowercase names do work from 127.0.0.1.
    record = random_id()
    lines = [b"x-internal-principal: ops-console", b"x-INTERNAL-role: MEMBER"]
    sandbox.reset()

    result = await exchange(gateway, request(headers=lines, body=ids_body([record])))

    assert result.reply.status == 200, result.reply.body
    seen = sandbox.last()["headers"]
    assert "x-internal-principal" not in seen and "x-internal-role" not in seen
    line = await access_line(gateway, result.reply.headers["X-Request-ID"])
    assert (line["principal"], line["role"], line["via"]) == (
        "ops-console",
        "MEMBER",
        "trusted-headers",
    )


async def test_a_100_kb_bearer_token_is_invalid_request_never_echoed_or_logged(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    token = fresh_token() + secrets.token_urlsafe(75_000)
    assert len(token) > 100_000
    data = request(authorization=b"Bearer " + token.encode(), body=ids_body([random_id()]))
    result = await attack(gateway, sandbox, creds, data)
    assert_refused(result.reply, 400, "InvalidRequest")
    await assert_never_echoed_or_logged(gateway, result, token)


async def test_a_5_kb_bearer_token_is_401_never_echoed_or_logged(
    gateway: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    token = fresh_token() + secrets.token_urlsafe(3_800)
    assert 5_000 <= len(token) < 8_000
    data = request(authorization=b"Bearer " + token.encode(), body=ids_body([random_id()]))
    result = await attack(gateway, sandbox, creds, data)
    assert_refused(result.reply, 401, "Unauthorized")
    line = await assert_never_echoed_or_logged(gateway, result, token)
    assert line["reason"] == "malformed bearer token"


# --- slow and idle clients ----------------------------------------------------------------


async def until_eof(reader: asyncio.StreamReader, started: float) -> tuple[bytes, float]:
    """Everything up to the gateway's hang-up (a reset counts), and when that came."""
    try:
        data = await reader.read()
    except ConnectionError:
        data = b""
    return data, time.monotonic() - started


async def trickle_headers(port: int) -> Exchange:
    """Send a request line, then header lines for up to TRICKLE_S (each long before the
    gateway's idle timer would fire) until the gateway hangs up."""
    lines = 100  # fewer than the 128 headers aiohttp takes
    reader, writer = await connect(port)
    started = time.monotonic()
    closed = asyncio.create_task(until_eof(reader, started))
    try:
        writer.write(f"POST {RESTORE} HTTP/1.1\r\nHost: gateway.test\r\n".encode())
        for n in range(lines):
            if closed.done():
                break
            writer.write(b"X-Slow-%d: x\r\n" % n)
            await writer.drain()
            await asyncio.sleep(TRICKLE_S / lines)
    except ConnectionError:  # hung up on while a line was on its way
        pass
    try:
        data, seconds = await asyncio.wait_for(closed, 10)
    finally:
        closed.cancel()
        writer.close()
    return Exchange(data, seconds)


async def trickle_body(port: int, token: str) -> tuple[Exchange, float]:
    """Send whole headers announcing 1000 bytes, then one byte every 100 ms for up to
    TRICKLE_S.

    Returns the answer and when the connection closed, and when the answer came
    (both in seconds after the headers were sent)."""
    reader, writer = await connect(port)
    started = time.monotonic()

    async def answer_then_close() -> tuple[bytes, float, float]:
        data = await read_answer(reader, timeout_s=TRICKLE_S + 10)
        answered = time.monotonic() - started
        await until_closed(reader)
        return data, answered, time.monotonic() - started

    answer = asyncio.create_task(answer_then_close())
    try:
        writer.write(
            f"POST {RESTORE} HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        for _ in range(int(TRICKLE_S * 10)):
            if answer.done():
                break
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.1)
        data, answered, closed = await answer
    finally:
        answer.cancel()
        writer.close()
    return Exchange(data, closed), answered


async def test_a_client_trickling_headers_is_cut_off_at_keepalive_timeout(
    hardened: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    with sandbox.untouched():
        result = await trickle_headers(hardened.port)
    assert result.data == b""  # no request was ever complete: nothing to answer
    # Cut off at keepalive_timeout_s, not when the client would have stopped.
    assert KEEPALIVE_S - 0.1 <= result.seconds < (KEEPALIVE_S + TRICKLE_S) / 2
    await assert_still_serving(hardened, creds)


async def test_a_client_trickling_a_body_gets_408_and_is_closed(
    hardened: GatewayProc, sandbox: SandboxProc, creds: Creds
) -> None:
    with sandbox.untouched():
        result, answered = await trickle_body(hardened.port, creds.tokens["MEMBER"])
    assert_refused(result.reply, 408, "RequestTimeout")
    assert result.reply.headers["Connection"] == "close"
    assert BODY_TIMEOUT_S - 0.1 <= answered < (BODY_TIMEOUT_S + TRICKLE_S) / 2
    # aiohttp then drains what still trickles in for LINGER_S at most, and closes.
    assert result.seconds < (BODY_TIMEOUT_S + LINGER_S + TRICKLE_S) / 2
    await assert_still_serving(hardened, creds)


async def test_normal_requests_are_served_promptly_while_50_clients_trickle(
    start_gateway: Callable[..., GatewayProc], creds: Creds
) -> None:
    # Timers that let the slow clients hold on for the whole test: a request that had to
    # wait for one of them would wait about hold_s, far from being answered at once.
    hold_s = 10.0
    gw = start_gateway(settings={"keepalive_timeout_s": hold_s, "body_timeout_s": hold_s})
    slow = [
        asyncio.create_task(
            trickle_headers(gw.port) if n % 2 else trickle_body(gw.port, creds.tokens["MEMBER"])
        )
        for n in range(50)
    ]
    took: list[float] = []
    try:
        # All 25 trickling bodies are in flight: their headers were read and judged.
        await poll(lambda: in_flight(gw) == 25)
        for _ in range(12):
            started = time.monotonic()
            await assert_still_serving(gw, creds)
            took.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
        gone = [task for task in slow if task.done()]
        assert not gone, f"{len(gone)} slow clients were cut off before their {hold_s} s"
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
    assert max(took) < hold_s / 2, took


async def test_a_caller_that_never_reads_its_answer_does_not_hold_the_gateway(
    hardened: GatewayProc, creds: Creds
) -> None:
    # The largest answer the records API gives (1000 trash entries, over 100 kB), asked
    # for by callers whose receive buffers are tiny and who never read.
    sockets = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.connect(("127.0.0.1", hardened.port))
        sock.sendall(
            f"GET {TRASH}?limit=1000 HTTP/1.1\r\nHost: gateway.test\r\n"
            f"Authorization: {creds.bearer('VIEWER')}\r\n\r\n".encode()
        )
        sockets.append(sock)
    try:
        await poll(lambda: in_flight(hardened) == 0 and len(trash_lines(hardened)) >= 5)
        await assert_still_serving(hardened, creds)
    finally:
        for sock in sockets:
            sock.close()


def in_flight(gw: GatewayProc) -> float:
    return sample(gw.metrics(), "gateway_in_flight_requests")


def trash_lines(gw: GatewayProc) -> list[dict[str, Any]]:
    return [e for e in gw.access_lines() if e["path"] == TRASH]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for IDLE_CONNECTIONS sockets here and in a gateway started from here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + 512
    if soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot open 2000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass(frozen=True)
class Idle:
    """A connection that sends nothing, and when it was opened (just before connecting,
    so the gateway's idle timer cannot have started earlier)."""

    opened: float
    sock: socket.socket


def open_idle(port: int, count: int) -> list[Idle]:
    """``count`` idle connections, opened in batches the listener can take in."""
    idle: list[Idle] = []
    while len(idle) < count:
        for _ in range(min(100, count - len(idle))):
            opened = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            idle.append(Idle(opened, sock))
        time.sleep(0.02)  # lets the gateway accept them before its backlog fills
    return idle


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False  # still open, nothing to read
    except ConnectionError:
        return True


def closed_early(idle: list[Idle]) -> list[float]:
    """The ages of the connections the gateway closed before keepalive_timeout_s was up.
    Each age is taken after its check, so it can only overstate how long it stayed open."""
    early = []
    for connection in idle:
        closed = closed_by_peer(connection.sock)
        age = time.monotonic() - connection.opened
        if closed and age < KEEPALIVE_S * 0.9:
            early.append(age)
    return early


async def test_2000_idle_connections_are_closed_and_cost_little(
    many_files: None,
    start_gateway: Callable[..., GatewayProc],
    creds: Creds,
) -> None:
    gw = start_gateway(settings={"keepalive_timeout_s": KEEPALIVE_S})
    for _ in range(20):  # warm up, so the baseline holds what serving needs anyway
        await assert_still_serving(gw, creds)
    baseline = rss_bytes(gw.proc.pid)

    idle = open_idle(gw.port, IDLE_CONNECTIONS)
    try:
        with_idle = rss_bytes(gw.proc.pid)
        assert not closed_early(idle)
        records = [random_id() for _ in range(20)]
        async with aiohttp.ClientSession() as session:
            replies = await asyncio.gather(
                *(
                    gw.send(
                        session,
                        "POST",
                        RESTORE,
                        headers={
                            "Authorization": creds.bearer("MEMBER"),
                            "Content-Type": "application/json",
                        },
                        data=ids_body([record]),
                    )
                    for record in records
                )
            )
        assert [r.status for r in replies] == [200] * 20
        assert not closed_early(idle)  # serving beside them closed none of them either
        # All closed at keepalive_timeout_s, long before the default 75 s.
        await poll(lambda: all(closed_by_peer(c.sock) for c in idle), timeout_s=KEEPALIVE_S * 10)
        after = rss_bytes(gw.proc.pid)
    finally:
        for connection in idle:
            connection.sock.close()

    assert with_idle - baseline < 30 * MIB, (baseline, with_idle)
    assert after - baseline < 30 * MIB, (baseline, after)
    await assert_still_serving(gw, creds)
