"""``solapi-gateway explain``: one request walked through the policy, nothing sent.

Its output names every step's outcome and ends with "would forward" or the
exact errorCode; its exit code is 0 (would forward), 1 (would refuse) or 2
(bad config or usage). The end-to-end half walks one table of requests through
both explain and a running gateway in front of the sandbox: each gets the same
answer (status and errorCode), and "would forward" exactly when the request
reached upstream.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support import (
    REPO,
    TRUSTED_PRINCIPAL,
    TRUSTED_ROLE,
    Creds,
    GatewayProc,
    SandboxProc,
    SdkKey,
    poll,
)

from gateway import cli, signing
from gateway.signing import Secret

DEMO = str(REPO / "config" / "demo" / "gateway.yaml")
ID = "CRMRC2026112800000000ABCDEF12345"
RESTORE = "/crm-core/v1/records/bulk/restore"
DELETE = "/crm-core/v1/records/bulk/delete"
TRASH = "/crm-core/v1/records/trash"

Explain = Callable[..., tuple[int, list[str]]]


@pytest.fixture
def explain(capsys: pytest.CaptureFixture[str]) -> Explain:
    """``explain(*args) -> (exit code, stdout lines)``, run in this process."""

    def run(*args: str) -> tuple[int, list[str]]:
        code = cli.main(["explain", *args])
        return code, capsys.readouterr().out.splitlines()

    return run


def body_file(tmp_path: Path, document: Any) -> str:
    path = tmp_path / f"body-{secrets.token_hex(4)}.json"
    path.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
    return str(path)


# --- the output -----------------------------------------------------------------------------


def test_an_allowed_request_lists_each_step_and_would_forward(
    explain: Explain, tmp_path: Path
) -> None:
    document = {"recordIds": [ID]}
    body = body_file(tmp_path, document)
    code, lines = explain(
        "--config", DEMO, "--token", "demo-member-token", "POST", RESTORE, "--body", body
    )
    size = len(json.dumps(document))
    assert code == 0
    assert lines == [
        f"POST {RESTORE}  (nothing is sent)",
        f"  target    ok       {RESTORE}",
        "  identity  ok       demo-member (role MEMBER, via token)",
        f"  route     ok       records-bulk-restore (POST {RESTORE})",
        "  role      ok       MEMBER is at least MEMBER",
        "  params    ok       none to check",
        "  query     ok       none given",
        f"  body      ok       recordIds: 1 valid item(s), {size} bytes",
        "  rules     ok       none",
        "  limits    ok       none apply",
        f"would forward: POST http://127.0.0.1:8089{RESTORE}",
    ]


def test_the_query_step_names_each_parameter_or_the_refusal(explain: Explain) -> None:
    args = ("--config", DEMO, "--token", "demo-viewer-token", "GET")
    code, lines = explain(*args, TRASH + "?limit=5&offset=0")
    assert code == 0
    assert "  query     ok       limit matches, offset matches" in lines
    code, lines = explain(*args, TRASH + "?limit=5&sgw_secret_token=1")
    assert code == 1
    assert lines[-4:] == [
        "  body      -        not reached",
        "  rules     -        not reached",
        "  limits    -        not reached",
        "would refuse: 400 InvalidQuery",
    ]
    assert lines[6] == (
        "  query     REFUSED  400 InvalidQuery: The query holds a parameter this route does"
        " not take (it takes: limit, offset)."
    )
    assert not any("sgw_secret_token" in line for line in lines[1:])


def test_a_permanent_delete_by_a_member_is_refused_at_the_rules_step(
    explain: Explain, tmp_path: Path
) -> None:
    body = body_file(tmp_path, {"recordIds": [ID], "permanent": True})
    args = ("--config", DEMO, "POST", DELETE, "--body", body)
    code, lines = explain("--token", "demo-member-token", *args)
    assert code == 1
    assert lines[-3:-1] == [
        "  rules     REFUSED  403 Forbidden: Route records-bulk-delete needs role OWNER or"
        " higher when permanent is not false.",
        "  limits    -        not reached",
    ]
    assert lines[-1] == "would refuse: 403 Forbidden"
    code, lines = explain("--token", "demo-owner-token", *args)
    assert code == 0
    assert lines[-3] == "  rules     ok       permanent is not false: OWNER is at least OWNER"


def test_a_refusal_shows_the_reason_and_which_steps_were_not_reached(explain: Explain) -> None:
    code, lines = explain("--config", DEMO, "--token", "no-such-token", "GET", "/cash/v1/balance")
    assert code == 1
    assert lines[1:] == [
        "  target    ok       /cash/v1/balance",
        "  identity  REFUSED  401 Unauthorized: unknown bearer token",
        "  route     -        not reached",
        "  role      -        not reached",
        "  params    -        not reached",
        "  query     -        not reached",
        "  body      -        not reached",
        "  rules     -        not reached",
        "  limits    -        not reached",
        "would refuse: 401 Unauthorized",
    ]


@pytest.mark.parametrize(
    ("args", "last"),
    [
        (
            ("--principal", "ops", "--role", "VIEWER", "DELETE", f"/crm-core/v1/records/{ID}"),
            "403 Forbidden",
        ),
        (
            ("--principal", "ops", "--role", "MEMBER", "DELETE", "/crm-core/v1/records/x"),
            "400 InvalidItem",
        ),
        (("--principal", "ops", "--role", "MEMBER", "DELETE", f"/crm-core/v1/records/{ID}"), None),
        (("--principal", "ops", "--role", "ADMIN", "GET", "/cash/v1/balance"), "401 Unauthorized"),
        (("--token", "demo-owner-token", "GET", "/crm-core/v1/records"), "404 RouteNotFound"),
        (("--token", "demo-owner-token", "PUT", RESTORE), "405 MethodNotAllowed"),
        (("--token", "demo-owner-token", "GET", "/crm-core/../x"), "400 InvalidPath"),
        (("--token", "demo-owner-token", "POST", RESTORE), "415 UnsupportedMediaType"),
        (
            (
                "--token",
                "demo-owner-token",
                "-H",
                "Content-Type: application/json",
                "POST",
                RESTORE,
            ),
            "400 InvalidJSON",  # an empty body is not JSON
        ),
        (
            ("--token", "demo-owner-token", "-H", "Content-Type: text/plain", "POST", RESTORE),
            "415 UnsupportedMediaType",
        ),
        (("GET", "/cash/v1/balance"), "401 Unauthorized"),  # no identity at all
    ],
)
def test_each_refusal_ends_with_its_status_and_error_code(
    explain: Explain, args: tuple[str, ...], last: str | None
) -> None:
    code, lines = explain("--config", DEMO, *args)
    if last is None:
        assert code == 0
        assert lines[-1].startswith("would forward: ")
    else:
        assert code == 1
        assert lines[-1] == f"would refuse: {last}"


def test_principal_and_role_come_as_trusted_headers_from_a_trusted_peer(
    explain: Explain,
) -> None:
    code, lines = explain(
        "--config", DEMO, "--principal", "ops", "--role", "OWNER", "GET", "/cash/v1/balance"
    )
    assert code == 0
    assert lines[2] == "  identity  ok       ops (role OWNER, via trusted-headers)"
    # The same headers from a peer outside trusted_headers.sources count for nothing.
    code, lines = explain(
        "--config", DEMO, "--principal", "ops", "--role", "OWNER", "--peer", "10.9.8.7",
        "GET", "/cash/v1/balance",
    )  # fmt: skip
    assert code == 1
    assert (
        lines[2] == "  identity  REFUSED  401 Unauthorized: identity headers from an untrusted peer"
    )


def test_without_trusted_headers_principal_and_role_are_assumed_and_said_so(
    explain: Explain, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text((REPO / "config/demo/gateway.yaml").read_text())
    (tmp_path / "api_secret").write_text("s3cret")
    policy = (REPO / "config/demo/policy.yaml").read_text()
    start = policy.index("trusted_headers:")
    end = policy.index("routes:")
    (tmp_path / "policy.yaml").write_text(policy[:start] + policy[end:])

    code, lines = explain(
        "--config", str(config), "--principal", "ops", "--role", "MEMBER", "GET", "/cash/v1/balance"
    )
    assert code == 0
    assert lines[2] == (
        "  identity  ok       ops (role MEMBER, via trusted-headers)"
        " [trusted headers are off in this policy: assumed for this run]"
    )


def test_the_body_can_come_from_stdin(
    explain: Explain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stdin = tmp_path / "stdin"
    stdin.write_bytes(json.dumps({"recordIds": [ID, ID]}).encode())
    with stdin.open("rb") as fh:
        monkeypatch.setattr("sys.stdin", type("S", (), {"buffer": fh})())
        code, lines = explain(
            "--config", DEMO, "--token", "demo-member-token", "POST", RESTORE, "--body", "-"
        )
    assert code == 1
    assert lines[-1] == "would refuse: 400 DuplicateItems"


def test_explain_opens_no_socket(
    explain: Explain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("explain opened a socket")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket, "socketpair", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    body = body_file(tmp_path, {"recordIds": [ID]})
    code, lines = explain(
        "--config", DEMO, "--token", "demo-member-token", "POST", RESTORE, "--body", body
    )
    assert code == 0, lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--principal", "ops", "GET", "/x"), "explain: --principal and --role go together"),
        (("--role", "OWNER", "GET", "/x"), "explain: --principal and --role go together"),
        (("-H", "no colon", "GET", "/x"), "--header: expected 'Name: value', got 'no colon'"),
        (("--body", "/no/such/file", "GET", "/x"), "--body: cannot read it: No such file"),
        (("--http-version", "two", "GET", "/x"), "--http-version: expected e.g. 1.1, got 'two'"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    assert cli.main(["explain", "--config", DEMO, *args]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_config_exits_2_naming_file_line_and_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "gateway.yaml").write_text((REPO / "config/demo/gateway.yaml").read_text())
    (tmp_path / "api_secret").write_text("s3cret")
    policy = (REPO / "config/demo/policy.yaml").read_text()
    (tmp_path / "policy.yaml").write_text(policy.replace("min_role: OWNER", "min_role: ROOT"))
    config = str(tmp_path / "gateway.yaml")
    assert cli.main(["explain", "--config", config, "GET", "/cash/v1/balance"]) == 2
    err = capsys.readouterr().err
    line = policy.splitlines().index("        min_role: OWNER") + 1
    assert f"{tmp_path / 'policy.yaml'}:{line}: routes[1].rules[0].min_role: unknown role" in err


def test_the_console_script_exits_1_on_a_refusal() -> None:
    done = subprocess.run(
        [console_script(), "explain", "--config", DEMO, "GET", "/cash/v1/balance"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[-1] == "would refuse: 401 Unauthorized"


def test_two_host_headers_are_refused_at_the_target_step_before_identity() -> None:
    done = subprocess.run(
        [console_script(), "explain", "--config", DEMO, "-H", "Host: a", "-H", "Host: b",
         "POST", RESTORE],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:3] == [
        "  target    REFUSED  400 InvalidRequest: The request carries more than one Host header.",
        "  identity  -        not reached",
    ]
    assert lines[-1] == "would refuse: 400 InvalidRequest"


@pytest.mark.parametrize(
    ("args", "first", "target"),
    [
        (
            ("--http-version", "HTTP/2.0", "GET", "/cash/v1/balance"),
            "GET /cash/v1/balance HTTP/2.0  (nothing is sent)",
            "  target    REFUSED  400 InvalidRequest: The gateway serves HTTP/1.0 and HTTP/1.1"
            " requests only.",
        ),
        (
            ("-H", "Transfer-Encoding: gzip", "POST", RESTORE),
            f"POST {RESTORE}  (nothing is sent)",
            "  target    REFUSED  400 InvalidRequest: The only transfer coding accepted is"
            " chunked.",
        ),
        (
            ("--http-version", "1.0", "-H", "Transfer-Encoding: chunked", "POST", RESTORE),
            f"POST {RESTORE} HTTP/1.0  (nothing is sent)",
            "  target    REFUSED  400 InvalidRequest: Transfer-Encoding is not allowed on an"
            " HTTP/1.0 request.",
        ),
    ],
)
def test_the_version_and_framing_are_judged_at_the_target_step(
    explain: Explain, args: tuple[str, ...], first: str, target: str
) -> None:
    code, lines = explain("--config", DEMO, "--token", "demo-owner-token", *args)
    assert code == 1
    assert lines[:3] == [first, target, "  identity  -        not reached"]
    assert lines[-1] == "would refuse: 400 InvalidRequest"
    code, lines = explain("--config", DEMO, "--http-version", "1.0", "GET", TRASH + "?limit=1")
    assert lines[1] == f"  target    ok       {TRASH}"


def console_script() -> str:
    return str(Path(sys.executable).with_name("solapi-gateway"))


# --- end to end: explain and the running gateway answer one table alike --------------------


def sdk_header(key: SdkKey, skew_s: float = 0) -> str:
    date = datetime.fromtimestamp(time.time() + skew_s, UTC).isoformat()
    return signing.authorization(key.api_key, Secret(key.secret), date, secrets.token_hex(16))


def ids(*items: str, **extra: Any) -> bytes:
    return json.dumps({"recordIds": list(items), **extra}).encode()


@dataclass(frozen=True)
class Case:
    """One request: its expected outcome ("forward", or "STATUS errorCode"), then
    the request line, who sends it, extra headers (names may repeat) and the body.

    ``who``: a role (its bearer token), ``trusted:ROLE`` (the trusted identity
    headers), ``sdk`` / ``sdk-20-min-old`` (an internal key's HMAC signature),
    ``unknown-token``, or None. A body without a Content-Type header goes as
    application/json, as ``explain --body`` assumes. ``version`` is what the
    request line names (None: no version at all, which the parser reads as 0.9)."""

    expect: str
    method: str
    target: str
    who: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    version: str | None = "1.1"


JSON = (("Content-Type", "application/json"),)
TWO_HOSTS = (("Host", "gateway.test"), ("Host", "evil.test"))
TRUSTED = ((TRUSTED_PRINCIPAL, "ops"), (TRUSTED_ROLE, "OWNER"))


def parity_table(trash: list[str]) -> list[Case]:
    """Every step of the walk refusing at least once, and requests that pass it."""
    too_many = [f"CRMRC{n:016d}ABCDEFGHIJK" for n in range(1001)]
    utf7 = b'{"recordIds": ["' + trash[1].encode() + b'"], "+AHA-ermanent": true}'
    return [
        # target: HTTP/1.0 or 1.1, one Host, a framing it trusts, then canonical syntax;
        # refused before identity is even looked at
        Case("400 InvalidRequest", "POST", RESTORE, "MEMBER", TWO_HOSTS, ids(trash[0])),
        Case("400 InvalidRequest", "GET", "/crm-core/../x", None, TWO_HOSTS),
        Case("400 InvalidRequest", "POST", RESTORE, "MEMBER", (*JSON, *JSON), ids(trash[1])),
        Case("400 InvalidRequest", "GET", TRASH, "VIEWER", version="2.0"),
        Case("400 InvalidRequest", "GET", TRASH, "VIEWER", version="0.9"),
        Case("400 InvalidRequest", "GET", TRASH, "VIEWER", version=None),
        Case("400 InvalidRequest", "GET", "/crm-core/../x", None, version="2.0"),
        Case("400 InvalidRequest", "POST", RESTORE, "MEMBER", (("Transfer-Encoding", "gzip"),)),
        Case("400 InvalidRequest", "POST", RESTORE, None, (("Transfer-Encoding", "gzip,chunked"),)),
        Case("400 InvalidRequest", "GET", TRASH, "VIEWER", (("Transfer-Encoding", "chunked"),),
             version="1.0"),
        Case("forward", "GET", TRASH + "?limit=2", "VIEWER", (("Host", "gateway.test"),)),
        Case("forward", "GET", TRASH + "?offset=1", "VIEWER", version="1.0"),
        Case("400 InvalidPath", "GET", "/crm-core/v1/records/../records/trash", "VIEWER"),
        Case("400 InvalidPath", "GET", "/crm-core/v1/records%2Ftrash", "VIEWER"),
        Case("400 InvalidPath", "GET", "/crm-core/v1//records/trash", "VIEWER"),
        # identity
        Case("401 Unauthorized", "GET", "/cash/v1/balance"),
        Case("401 Unauthorized", "GET", TRASH, "unknown-token"),
        Case("401 Unauthorized", "GET", TRASH, "unknown-token", TRUSTED),  # Authorization wins
        Case("401 Unauthorized", "GET", TRASH, "trusted:ADMIN"),  # not one of the roles
        Case("401 Unauthorized", "GET", TRASH, None, (("Authorization", "Basic b3BzOng="),)),
        Case("401 Unauthorized", "GET", "/cash/v1/balance", "sdk-20-min-old"),
        Case("forward", "GET", "/cash/v1/balance", "sdk"),
        # route
        Case("404 RouteNotFound", "GET", "/crm-core/v1/records", "VIEWER"),
        Case("404 RouteNotFound", "GET", TRASH + "/", "VIEWER"),
        Case("405 MethodNotAllowed", "PATCH", TRASH, "VIEWER"),
        # role, then path parameters
        Case("403 Forbidden", "POST", RESTORE, "VIEWER", body=ids(trash[1])),
        Case("403 Forbidden", "POST", RESTORE, "VIEWER", (("Content-Type", "text/plain"),), b"x"),
        Case("400 InvalidItem", "DELETE", "/crm-core/v1/records/not-an-id", "MEMBER"),
        Case("forward", "POST", f"/crm-core/v1/records/{trash[2]}/restore", "trusted:MEMBER"),
        # query: after the role, with the path parameters
        Case("403 Forbidden", "POST", RESTORE + "?x=1", "VIEWER", body=ids(trash[1])),
        Case("400 InvalidQuery", "POST", RESTORE + "?x=1", "MEMBER", body=ids(trash[1])),
        Case("400 InvalidQuery", "POST", DELETE + "?permanent=true", "OWNER", body=ids(trash[1])),
        Case("400 InvalidQuery", "DELETE", f"/crm-core/v1/records/{trash[1]}?permanent=true",
             "MEMBER"),
        Case("400 InvalidQuery", "GET", TRASH + "?limit=1&limit=1000", "VIEWER"),
        Case("400 InvalidQuery", "GET", TRASH + "?limit=1;permanent=true", "VIEWER"),
        Case("400 InvalidQuery", "GET", "/cash/v1/balance?x", "sdk"),
        # body
        Case("415 UnsupportedMediaType", "POST", RESTORE, "MEMBER"),
        Case("415 UnsupportedMediaType", "POST", RESTORE, "MEMBER",
             (("Content-Type", "text/plain"),), ids(trash[1])),
        Case("415 UnsupportedMediaType", "POST", RESTORE, "MEMBER",
             (*JSON, ("Content-Encoding", "gzip")), ids(trash[1])),
        Case("415 UnsupportedMediaType", "POST", RESTORE, "MEMBER",
             (*JSON, ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")),
             ids(trash[1])),
        Case("415 UnsupportedMediaType", "POST", DELETE, "MEMBER",
             (("Content-Type", "application/json; charset=utf-7"),), utf7),
        Case("413 PayloadTooLarge", "POST", RESTORE, "MEMBER", JSON, b" " * 70_000),
        Case("400 InvalidJSON", "POST", RESTORE, "MEMBER", JSON, b"{nope"),
        Case("400 BatchEmpty", "POST", RESTORE, "MEMBER", body=ids()),
        Case("400 BatchTooLarge", "POST", RESTORE, "MEMBER", body=ids(*too_many)),
        Case("400 InvalidItem", "POST", RESTORE, "MEMBER", body=ids(trash[1], "CRMRC1")),
        Case("400 DuplicateItems", "POST", DELETE, "MEMBER", body=ids(trash[1], trash[1])),
        Case("400 InvalidBody", "POST", DELETE, "MEMBER", body=ids(trash[1], Permanent=True)),
        Case("400 InvalidBody", "POST", DELETE, "OWNER", body=ids(trash[1], **{"permanent ": 1})),
        Case("400 InvalidBody", "POST", RESTORE, "MEMBER", body=ids(trash[1], permanent=False)),
        # body rules
        Case("403 Forbidden", "POST", DELETE, "MEMBER", body=ids(trash[1], permanent=True)),
        Case("forward", "POST", DELETE, "OWNER", body=ids(trash[3], permanent=True)),
        # and through
        Case("forward", "POST", RESTORE, "MEMBER", body=ids(trash[0], trash[1])),
        Case("forward", "DELETE", f"/crm-core/v1/records/{trash[4]}", "MEMBER"),
    ]  # fmt: skip


def identity(who: str | None, creds: Creds, sdk_key: SdkKey) -> tuple[list[str], list[str]]:
    """``who`` as explain's options, and as the header lines that go on the wire."""
    if who is None:
        return [], []
    if who in creds.tokens:
        token = creds.tokens[who]
        return ["--token", token], [f"Authorization: Bearer {token}"]
    if who == "unknown-token":
        return ["--token", "sgw_unknown"], ["Authorization: Bearer sgw_unknown"]
    if who.startswith("trusted:"):
        role = who.removeprefix("trusted:")
        return (
            ["--principal", "ops", "--role", role],
            [f"{TRUSTED_PRINCIPAL}: ops", f"{TRUSTED_ROLE}: {role}"],
        )
    # Two signatures: the live one must not look like a replay of explain's.
    skew_s = {"sdk": 0, "sdk-20-min-old": -20 * 60}[who]
    explained, sent = sdk_header(sdk_key, skew_s), sdk_header(sdk_key, skew_s)
    return ["-H", f"Authorization: {explained}"], [f"Authorization: {sent}"]


def on_the_wire(case: Case, identity_lines: list[str]) -> bytes:
    """The request exactly as the table gives it: raw, so no client tidies the
    target or merges the two Host headers."""
    version = "" if case.version is None else f" HTTP/{case.version}"
    lines = [f"{case.method} {case.target}{version}", *identity_lines]
    lines += [f"{name}: {value}" for name, value in case.headers]
    names = {name.lower() for name, _ in case.headers}
    if "host" not in names:
        lines.append("Host: gateway.test")
    if case.body is not None:
        if "content-type" not in names:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(case.body)}")
    lines.append("Connection: close")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (case.body or b"")


@pytest.mark.e2e
async def test_explain_and_the_running_gateway_answer_the_table_alike(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    sdk_key: SdkKey,
    explain: Explain,
    tmp_path: Path,
) -> None:
    config = str(shipped_gateway.config_path)
    table = parity_table(sandbox.trash_ids(5))
    assert len(table) >= 25
    disagreements: list[str] = []
    for case in table:
        explain_args, identity_lines = identity(case.who, creds, sdk_key)
        args = ["--config", config, "--http-version", case.version or "0.9", *explain_args]
        for name, value in case.headers:
            args += ["-H", f"{name}: {value}"]
        if case.body is not None:
            args += ["--body", body_file(tmp_path, case.body)]
        with sandbox.untouched():
            code, lines = explain(*args, case.method, case.target)
        if code == 0:
            assert lines[-1].startswith(f"would forward: {case.method} "), lines
            explained = "forward"
        else:
            assert code == 1, lines
            explained = lines[-1].removeprefix("would refuse: ")

        before = sandbox.count()
        reply = await shipped_gateway.raw(on_the_wire(case, identity_lines))
        forwarded = sandbox.count() - before
        error = reply.headers.get("X-Gateway-Error")
        live = f"{reply.status} {error}" + f" (reached upstream {forwarded}x)" * bool(forwarded)
        if forwarded == 1 and error is None:
            live = "forward"

        # The route explain names is the one the access log names.
        rid = reply.headers["X-Request-ID"]

        def logged(rid: str = rid) -> list[dict[str, Any]]:
            return [a for a in shipped_gateway.access_lines() if a["request_id"] == rid]

        await poll(lambda: bool(logged()))
        step = next((line for line in lines if line.startswith("  route     ok ")), None)
        explained_route = step.split()[2] if step is not None else None
        logged_route = logged()[0]["route"]

        said = f"{case.method} {case.target} as {case.who}"
        if not case.expect == explained == live:
            disagreements.append(
                f"{said}: expected {case.expect}, explain says {explained},"
                f" the gateway answered {live}"
            )
        elif explained_route not in (None, logged_route):
            disagreements.append(f"{said}: explain names {explained_route}, the log {logged_route}")
    assert disagreements == []
