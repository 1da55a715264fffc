"""``solapi-gateway explain``: one request walked through the policy, nothing sent.

Its output names every step's outcome and ends with "would forward" or the
exact errorCode; its exit code is 0 (would forward), 1 (would refuse) or 2
(bad config or usage). The end-to-end half sends the same requests to a
running gateway and checks that explain predicted each answer.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import REPO, Creds, GatewayProc, Reply, SandboxProc, SdkKey, poll

from gateway import cli, signing
from gateway.signing import Secret

DEMO = str(REPO / "config" / "demo" / "gateway.yaml")
ID = "CRMRC2026112800000000ABCDEF12345"
RESTORE = "/crm-core/v1/records/bulk/restore"
DELETE = "/crm-core/v1/records/bulk/delete"

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
        "--config", DEMO, "--token", "demo-member-token", "POST", RESTORE + "?x=1", "--body", body
    )
    size = len(json.dumps(document))
    assert code == 0
    assert lines == [
        f"POST {RESTORE}?x=1  (nothing is sent)",
        f"  target    ok       {RESTORE}",
        "  identity  ok       demo-member (role MEMBER, via token)",
        f"  route     ok       records-bulk-restore (POST {RESTORE})",
        "  role      ok       MEMBER is at least MEMBER",
        "  params    ok       none to check",
        f"  body      ok       recordIds: 1 valid item(s), {size} bytes",
        "  rules     ok       none",
        f"would forward: POST http://127.0.0.1:8089{RESTORE}?x=1",
    ]


def test_a_permanent_delete_by_a_member_is_refused_at_the_rules_step(
    explain: Explain, tmp_path: Path
) -> None:
    body = body_file(tmp_path, {"recordIds": [ID], "permanent": True})
    args = ("--config", DEMO, "POST", DELETE, "--body", body)
    code, lines = explain("--token", "demo-member-token", *args)
    assert code == 1
    assert lines[-2] == (
        "  rules     REFUSED  403 Forbidden: Route records-bulk-delete needs role OWNER or"
        " higher when permanent is not false."
    )
    assert lines[-1] == "would refuse: 403 Forbidden"
    code, lines = explain("--token", "demo-owner-token", *args)
    assert code == 0
    assert lines[-2] == "  rules     ok       permanent is not false: OWNER is at least OWNER"


def test_a_refusal_shows_the_reason_and_which_steps_were_not_reached(explain: Explain) -> None:
    code, lines = explain("--config", DEMO, "--token", "no-such-token", "GET", "/cash/v1/balance")
    assert code == 1
    assert lines[1:] == [
        "  target    ok       /cash/v1/balance",
        "  identity  REFUSED  401 Unauthorized: unknown bearer token",
        "  route     -        not reached",
        "  role      -        not reached",
        "  params    -        not reached",
        "  body      -        not reached",
        "  rules     -        not reached",
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


def console_script() -> str:
    return str(Path(sys.executable).with_name("solapi-gateway"))


# --- end to end: explain predicts what the running gateway does ----------------------------


def sdk_header(key: SdkKey, skew_s: float = 0) -> str:
    date = datetime.fromtimestamp(time.time() + skew_s, UTC).isoformat()
    return signing.authorization(key.api_key, Secret(key.secret), date, secrets.token_hex(16))


def cases(creds: Creds, sdk_key: SdkKey, sandbox: SandboxProc) -> list[dict[str, Any]]:
    """Requests as (identity, method, target, headers, body), each sent both ways."""
    trash = sandbox.trash_ids(4)
    member, owner, viewer = (("--token", creds.tokens[r]) for r in ("MEMBER", "OWNER", "VIEWER"))
    ops = ("--principal", "ops", "--role", "MEMBER")
    json_ct = {"Content-Type": "application/json"}
    return [
        dict(who=member, method="POST", target=RESTORE, body={"recordIds": trash[:2]}),
        dict(who=viewer, method="POST", target=RESTORE, body={"recordIds": trash[2:3]}),
        dict(who=member, method="POST", target=DELETE, body={"recordIds": [ID], "permanent": True}),
        dict(who=owner, method="POST", target=DELETE, body={"recordIds": [ID], "permanent": True}),
        dict(who=member, method="POST", target=DELETE, body={"recordIds": [ID, ID]}),
        dict(who=member, method="POST", target=RESTORE, raw=b"{nope", headers=json_ct),
        dict(
            who=member,
            method="POST",
            target=RESTORE,
            raw=b"{}",
            headers={"Content-Type": "text/plain"},
        ),
        dict(who=member, method="POST", target=RESTORE, raw=b" " * 70_000, headers=json_ct),
        dict(who=member, method="DELETE", target=f"/crm-core/v1/records/{trash[3]}"),
        dict(who=member, method="DELETE", target="/crm-core/v1/records/not-an-id"),
        dict(who=viewer, method="DELETE", target="/crm-core/v1/records/not-an-id"),
        dict(who=ops, method="POST", target=f"/crm-core/v1/records/{trash[3]}/restore"),
        dict(who=viewer, method="GET", target="/crm-core/v1/records/trash?limit=2"),
        dict(who=viewer, method="GET", target="/crm-core/v1/records"),
        dict(who=viewer, method="PATCH", target="/crm-core/v1/records/trash"),
        dict(who=("--token", "unknown"), method="GET", target="/crm-core/v1/records/trash"),
        dict(who=(), method="GET", target="/cash/v1/balance"),
        dict(who=(), method="GET", target="/cash/v1/balance", sdk=0),
        dict(who=(), method="GET", target="/cash/v1/balance", sdk=-20 * 60),
    ]


async def live(
    gateway: GatewayProc, session: aiohttp.ClientSession, case: dict[str, Any], creds: Creds
) -> Reply:
    headers = dict(case.get("headers", {}))
    who = case["who"]
    if who[:1] == ("--token",):
        headers["Authorization"] = f"Bearer {who[1]}"
    elif who[:1] == ("--principal",):
        headers.update({"X-Internal-Principal": who[1], "X-Internal-Role": who[3]})
    if "sdk_header" in case:
        headers["Authorization"] = case["sdk_header"]
    data = case.get("raw")
    if "body" in case:
        data = json.dumps(case["body"]).encode()
        headers.setdefault("Content-Type", "application/json")
    return await gateway.send(session, case["method"], case["target"], headers=headers, data=data)


@pytest.mark.e2e
async def test_explain_predicts_what_the_running_gateway_does(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    sdk_key: SdkKey,
    http_session: aiohttp.ClientSession,
    explain: Explain,
    tmp_path: Path,
) -> None:
    config = str(shipped_gateway.config_path)
    seen_codes = set()
    for n, case in enumerate(cases(creds, sdk_key, sandbox)):
        args = ["--config", config, *case["who"]]
        for name, value in case.get("headers", {}).items():
            args += ["-H", f"{name}: {value}"]
        if "body" in case or "raw" in case:
            args += ["--body", body_file(tmp_path, case.get("raw") or case.get("body"))]
        if "sdk" in case:  # two signatures: the live one must not look like a replay
            args += ["-H", f"Authorization: {sdk_header(sdk_key, case['sdk'])}"]
            case["sdk_header"] = sdk_header(sdk_key, case["sdk"])
        with sandbox.untouched():
            code, lines = explain(*args, case["method"], case["target"])
        before = sandbox.count()

        reply = await live(shipped_gateway, http_session, case, creds)

        forwarded = sandbox.count() - before
        verdict = lines[-1]
        if code == 0:
            assert verdict.startswith(f"would forward: {case['method']} "), (n, lines)
            assert forwarded == 1, (n, lines, reply.status, reply.body)
            assert "X-Gateway-Error" not in reply.headers, (n, reply.body)
        else:
            assert code == 1, (n, lines)
            error = reply.headers.get("X-Gateway-Error")
            assert verdict == f"would refuse: {reply.status} {error}", (n, lines, reply.body)
            assert forwarded == 0, n
            seen_codes.add(error)
        # A relayed answer reaches the caller just before its access line is written.
        rid = reply.headers["X-Request-ID"]

        def logged(rid: str = rid) -> list[dict[str, Any]]:
            return [a for a in shipped_gateway.access_lines() if a["request_id"] == rid]

        await poll(lambda: bool(logged()))
        access = logged()[0]
        assert access["status"] == reply.status
        route = next((s for s in lines if s.startswith("  route     ok ")), None)
        if route is not None:  # the route explain named is the one the log names
            assert route.split()[2] == access["route"], (n, lines, access)
    assert seen_codes == {
        "Forbidden",
        "DuplicateItems",
        "InvalidJSON",
        "UnsupportedMediaType",
        "PayloadTooLarge",
        "InvalidItem",
        "RouteNotFound",
        "MethodNotAllowed",
        "Unauthorized",
    }


@pytest.mark.e2e
async def test_explain_and_the_gateway_agree_on_an_invalid_path(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, explain: Explain
) -> None:
    target = "/crm-core/v1/records/../records/trash"
    code, lines = explain(
        "--config", str(shipped_gateway.config_path), "--token", creds.tokens["VIEWER"],
        "GET", target,
    )  # fmt: skip
    with sandbox.untouched():
        reply = await shipped_gateway.raw(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {creds.bearer('VIEWER')}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
    assert code == 1
    assert lines[-1] == f"would refuse: {reply.status} {reply.headers['X-Gateway-Error']}"
    assert lines[-1] == "would refuse: 400 InvalidPath"
