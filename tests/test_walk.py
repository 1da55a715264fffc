"""gateway/walk.py: the deciding steps of the walk, shared by the gateway and ``explain``.

No network and no event loop: a request is method, target, headers, peer and
body bytes, and the answer is a ``Decision`` listing each step's outcome.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict
from support import policy_from_text, principal_yaml, token_principals

from gateway import signing, walk
from gateway.errors import Unauthorized
from gateway.identity import verifier_for
from gateway.policy import Policy
from gateway.signing import Secret, Verifier

ID = "CRMRC2026112800000000ABCDEF12345"
RESTORE = "/crm-core/v1/records/bulk/restore"
DELETE = "/crm-core/v1/records/bulk/delete"
TRASH = "/crm-core/v1/records/trash"
LIMIT = 4096
TEXT = {"Content_Type": "text/plain"}
GZIP = {"Content_Encoding": "gzip"}
PERMANENT = b'{"recordIds": ["a"], "permanent": true}'
TOKENS = {"VIEWER": "viewer-token", "MEMBER": "member-token", "OWNER": "owner-token"}
SDK_KEY, SDK_SECRET = "NCSINTERNAL00001", "sdk-secret"

POLICY = (
    "roles: [VIEWER, MEMBER, OWNER]\nprincipals:\n"
    + token_principals(TOKENS, "{role}-svc")
    + principal_yaml("sdk-svc", "MEMBER", hmac_key=SDK_KEY, hmac_secret=SDK_SECRET)
    + f"""\
routes:
  - name: records-bulk-restore
    method: POST
    path: {RESTORE}
    min_role: MEMBER
    batch: {{field: recordIds, max_items: 3, item_pattern: "^CRMRC[0-9]{{16}}[0-9A-Za-z]{{11}}$"}}
  - name: records-bulk-delete
    method: POST
    path: {DELETE}
    min_role: MEMBER
    batch: {{field: recordIds, max_items: 3}}
    rules:
      - when: {{field: permanent, not_equals: false}}
        min_role: OWNER
  - name: record-delete
    method: DELETE
    path: /crm-core/v1/records/{{recordId}}
    min_role: MEMBER
    params: {{recordId: "^CRMRC[0-9]{{16}}[0-9A-Za-z]{{11}}$"}}
  - name: records-trash
    method: GET
    path: {TRASH}
    min_role: VIEWER
"""
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return policy_from_text(POLICY)


def headers_of(role: str | None, **extra: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    if role is not None:
        headers["Authorization"] = f"Bearer {TOKENS[role]}"
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return headers


def decide(
    policy: Policy,
    method: str,
    target: str,
    role: str | None,
    body: bytes = b"",
    *,
    verifier: Verifier | None = None,
    **headers: str,
) -> walk.Decision:
    return walk.decide(
        method,
        target,
        headers_of(role, **headers),
        "10.0.0.7",
        body,
        policy,
        verifier or verifier_for(policy),
        time.time(),
        LIMIT,
    )


def ids(*items: str) -> bytes:
    return json.dumps({"recordIds": list(items)}).encode()


def outcome(d: walk.Decision) -> list[tuple[str, bool]]:
    return [(step.name, step.ok) for step in d.steps]


def test_a_request_that_passes_records_every_step_in_order(policy: Policy) -> None:
    d = decide(policy, "POST", RESTORE + "?dry=1", "MEMBER", ids(ID))
    assert d.would_forward and d.error is None
    assert outcome(d) == [(name, True) for name in walk.STEPS]
    detail = {step.name: step.detail for step in d.steps}
    assert detail["target"] == RESTORE  # the query is not part of the path
    assert detail["identity"] == "member-svc (role MEMBER, via token)"
    assert detail["route"] == f"records-bulk-restore (POST {RESTORE})"
    assert detail["role"] == "MEMBER is at least MEMBER"
    assert detail["body"].startswith("recordIds: 1 valid item(s)")
    assert detail["rules"] == "none"
    assert (d.path, d.route_name, d.items) == (RESTORE, "records-bulk-restore", [ID])
    assert d.caller is not None and d.caller.principal == "member-svc"


@pytest.mark.parametrize(
    ("method", "target", "role", "body", "extra", "step", "code"),
    [
        ("POST", "/a/../b", "MEMBER", b"", {}, "target", "InvalidPath"),
        ("POST", RESTORE, None, b"not json", TEXT, "identity", "Unauthorized"),
        ("POST", "/no/such/path", None, b"{}", {}, "identity", "Unauthorized"),
        ("POST", "/no/such/path", "MEMBER", b"not json", {}, "route", "RouteNotFound"),
        ("GET", RESTORE, "MEMBER", b"", {}, "route", "MethodNotAllowed"),
        ("POST", RESTORE, "VIEWER", b"not json", TEXT, "role", "Forbidden"),
        ("POST", RESTORE, "VIEWER", b" " * (LIMIT + 1), {}, "role", "Forbidden"),
        ("DELETE", "/crm-core/v1/records/x", "VIEWER", b"", {}, "role", "Forbidden"),
        ("DELETE", "/crm-core/v1/records/x", "MEMBER", b"", {}, "params", "InvalidItem"),
        ("POST", RESTORE, "MEMBER", b" " * (LIMIT + 1), {}, "body", "PayloadTooLarge"),
        ("POST", RESTORE, "MEMBER", ids(ID), TEXT, "body", "UnsupportedMediaType"),
        ("GET", TRASH, "VIEWER", b"", GZIP, "body", "UnsupportedMediaType"),
        ("POST", RESTORE, "MEMBER", ids(ID, ID), {}, "body", "DuplicateItems"),
        ("POST", RESTORE, "MEMBER", ids(ID, ID + "x"), {}, "body", "InvalidItem"),
        ("POST", RESTORE, "MEMBER", ids(*[ID] * 4), {}, "body", "BatchTooLarge"),
        ("POST", DELETE, "MEMBER", PERMANENT, {}, "rules", "Forbidden"),
    ],
)  # fmt: skip
def test_the_first_step_that_says_no_ends_the_walk(
    policy: Policy,
    method: str,
    target: str,
    role: str | None,
    body: bytes,
    extra: dict[str, str],
    step: str,
    code: str,
) -> None:
    d = decide(policy, method, target, role, body, **extra)
    assert d.error is not None and d.error.code == code
    assert not d.would_forward
    reached = walk.STEPS[: walk.STEPS.index(step) + 1]
    assert outcome(d) == [(name, name != step) for name in reached]
    failed = d.steps[-1]
    assert failed.detail.startswith(f"{d.error.status} {code}: ")


def test_two_host_headers_are_refused_before_anything_else(policy: Policy) -> None:
    headers = headers_of("MEMBER")
    headers.add("Host", "a.test")
    headers.add("host", "b.test")
    d = walk.decide(
        "POST",
        "/a/../b",
        headers,
        "10.0.0.7",
        b"",
        policy,
        verifier_for(policy),
        time.time(),
        LIMIT,
    )
    assert d.error is not None and d.error.code == "InvalidRequest" and d.error.status == 400
    assert outcome(d) == [("target", False)]  # before the target's own syntax, even
    assert d.route_name == "unmatched" and d.path is None
    assert decide(policy, "POST", RESTORE, "MEMBER", ids(ID), Host="b.test").would_forward


# --- the target step: the version and framing the request line and headers say -----------


def framing(version: tuple[int, int], *headers: tuple[str, str]) -> str | None:
    return walk.framing_problem(version, CIMultiDict(headers))


@pytest.mark.parametrize("codings", [(), ("chunked",), ("CHUNKED",), (" chunked ",)])
def test_no_coding_or_plain_chunked_on_http_1_1_passes(codings: tuple[str, ...]) -> None:
    assert framing((1, 1), *(("Transfer-Encoding", c) for c in codings)) is None


@pytest.mark.parametrize(
    "codings",
    [("gzip, chunked",), ("deflate,chunked",), ("chunked", "chunked"), ("identity",), ("gzip",)],
)
def test_any_other_transfer_coding_is_refused(codings: tuple[str, ...]) -> None:
    problem = framing((1, 1), *(("Transfer-Encoding", c) for c in codings))
    assert problem in (
        "The only transfer coding accepted is chunked.",
        "The request carries more than one Transfer-Encoding header.",
    )


def test_transfer_encoding_on_http_1_0_is_refused() -> None:
    problem = framing((1, 0), ("Transfer-Encoding", "chunked"))
    assert problem == "Transfer-Encoding is not allowed on an HTTP/1.0 request."
    assert framing((1, 0)) is None


@pytest.mark.parametrize("version", [(2, 0), (0, 9), (1, 2), (3, 0)])
def test_only_http_1_0_and_1_1_are_served(policy: Policy, version: tuple[int, int]) -> None:
    assert framing(version) == "The gateway serves HTTP/1.0 and HTTP/1.1 requests only."
    d = walk.decide(
        "GET", TRASH, headers_of("VIEWER"), "10.0.0.7", b"", policy,
        verifier_for(policy), time.time(), LIMIT, version=version,
    )  # fmt: skip
    assert d.error is not None and d.error.code == "InvalidRequest"
    assert outcome(d) == [("target", False)]


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Content-Type", "Transfer-Encoding"])
def test_a_header_sent_twice_that_may_come_once_is_refused(name: str) -> None:
    problem = framing((1, 1), (name, "1"), (name.lower(), "1"))
    assert problem == f"The request carries more than one {name} header."


def test_a_transfer_coding_is_refused_before_identity(policy: Policy) -> None:
    d = decide(policy, "POST", RESTORE, None, b"", Transfer_Encoding="gzip")
    assert d.error is not None and d.error.code == "InvalidRequest"
    assert outcome(d) == [("target", False)]


# --- the query step -----------------------------------------------------------------------


QUERY_POLICY = POLICY.replace(
    f"    path: {TRASH}\n    min_role: VIEWER\n",
    f"    path: {TRASH}\n    min_role: VIEWER\n"
    '    query: {limit: "^[0-9]{1,4}$", offset: "^[0-9]{1,9}$"}\n',
)


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (TRASH, None),
        (TRASH + "?", None),
        (TRASH + "?limit=10", None),
        (TRASH + "?offset=0&limit=1000", None),
        (TRASH + "?limit=10&limit=20", "InvalidQuery"),  # which one counts? upstream's pick
        (TRASH + "?limit=10&permanent=true", "InvalidQuery"),
        (TRASH + "?limit=1%30", "InvalidQuery"),  # never decoded: % is not a digit
        (TRASH + "?lim%69t=1", "InvalidQuery"),
        (TRASH + "?limit=1+0", "InvalidQuery"),
        (TRASH + "?LIMIT=1", "InvalidQuery"),
        (TRASH + "?limit", "InvalidQuery"),
        (TRASH + "?limit=", "InvalidQuery"),
        (TRASH + "?&limit=1", "InvalidQuery"),
        (TRASH + "?limit=1;offset=2", "InvalidQuery"),
    ],
)
def test_with_query_every_parameter_is_listed_once_and_matches(
    target: str, code: str | None
) -> None:
    d = decide(policy_from_text(QUERY_POLICY), "GET", target, "VIEWER")
    if code is None:
        assert d.would_forward, d.steps
    else:
        assert d.error is not None and d.error.code == code and d.error.status == 400
        assert outcome(d)[-1] == ("query", False)


def test_the_query_step_runs_after_the_role_and_the_path_parameters(policy: Policy) -> None:
    strict = policy_from_text(QUERY_POLICY.replace("min_role: VIEWER", "min_role: MEMBER"))
    d = decide(strict, "GET", TRASH + "?nope=1", "VIEWER")
    assert d.error is not None and d.error.code == "Forbidden"
    # Without query: on the route, any query passes, as before.
    assert decide(policy, "GET", TRASH + "?anything=at&all=1", "VIEWER").would_forward


def test_the_route_is_named_for_logs_and_metrics_even_when_identity_fails(
    policy: Policy,
) -> None:
    d = decide(policy, "POST", RESTORE, None, b"")
    assert d.error is not None and d.error.code == "Unauthorized"
    assert d.route_name == "records-bulk-restore"  # found, though its step was not reached
    assert decide(policy, "PUT", RESTORE, None).route_name == "unmatched"
    assert decide(policy, "POST", "/a/../b", "MEMBER").route_name == "unmatched"


def test_a_rule_that_applies_is_named_in_the_rules_step(policy: Policy) -> None:
    d = decide(policy, "POST", DELETE, "OWNER", b'{"recordIds": ["a"], "permanent": true}')
    assert d.would_forward
    assert d.steps[-2].detail == "permanent is not false: OWNER is at least OWNER"
    d = decide(policy, "POST", DELETE, "MEMBER", b'{"recordIds": ["a"], "permanent": false}')
    assert d.would_forward
    assert d.steps[-2].detail == "none applies"


def test_locate_admit_check_body_is_what_decide_does(policy: Policy) -> None:
    """The live handler's calls (with the body read in between) are ``decide``."""
    headers = headers_of("MEMBER")
    d = walk.Decision("POST", RESTORE)
    walk.locate(d, headers, policy)
    assert outcome(d) == [("target", True)]
    assert d.route_name == "records-bulk-restore"  # already known, for logs and metrics
    walk.admit(d, headers, "10.0.0.7", policy, verifier_for(policy), time.time())
    assert outcome(d) == [(name, True) for name in walk.STEPS[:6]]
    assert not d.would_forward  # the body is still to be checked
    walk.check_body(d, headers, ids(ID), policy, LIMIT)
    assert d.would_forward
    assert d.steps == decide(policy, "POST", RESTORE, "MEMBER", ids(ID)).steps


# --- internal HMAC keys at the identity step ----------------------------------------------


def sdk_header(secret: str = SDK_SECRET, key: str = SDK_KEY, skew_s: float = 0) -> str:
    """The Python SDK's own dialect: ``ApiKey=``, ``Date=``, microseconds, +00:00."""
    date = datetime.fromtimestamp(time.time() + skew_s, UTC).isoformat()
    salt = secrets.token_hex(16)
    sig = signing.signature(Secret(secret), date, salt)
    return f"HMAC-SHA256 ApiKey={key}, Date={date}, salt={salt}, signature={sig}"


def test_an_internal_key_identifies_its_principal(policy: Policy) -> None:
    d = decide(policy, "GET", TRASH, None, Authorization=sdk_header())
    assert d.would_forward
    assert d.steps[1].detail == (
        "sdk-svc (role MEMBER, via hmac; a reused salt is known only to the running gateway)"
    )


@pytest.mark.parametrize(
    ("make_header", "reason"),
    [
        (lambda: sdk_header(secret="wrong"), "hmac bad signature (SignatureDoesNotMatch)"),
        (lambda: sdk_header(key="NCSNOBODY0000001"), "hmac unknown key (InvalidAPIKey)"),
        (lambda: sdk_header(skew_s=-16 * 60), "hmac skewed (RequestTimeTooSkewed)"),
        (lambda: sdk_header(skew_s=16 * 60), "hmac skewed (RequestTimeTooSkewed)"),
        (lambda: "HMAC-SHA256 apiKey=x, date=now", "hmac malformed (Unauthorized)"),
    ],
)
def test_internal_key_refusals_name_their_reason_for_the_log(
    policy: Policy, make_header: Callable[[], str], reason: str
) -> None:
    header = make_header()  # signed now, not when the tests were collected
    d = decide(policy, "GET", TRASH, None, Authorization=header)
    assert d.error is not None and d.error.code == "Unauthorized"
    assert d.error.reason is not None and d.error.reason.startswith(reason)
    # The caller hears the same words whatever the reason.
    assert d.error.body() == {
        "errorCode": "Unauthorized",
        "errorMessage": "Authentication required or credentials not accepted.",
    }
    if "malformed" not in reason and "unknown" not in reason:  # one of the policy's keys
        assert d.error.reason.endswith(", apiKey " + signing.parse(header).api_key)


@pytest.mark.parametrize("skew_s", [-14 * 60, 14 * 60])
def test_a_skew_of_14_minutes_is_accepted(policy: Policy, skew_s: float) -> None:
    header = sdk_header(skew_s=skew_s)
    d = decide(policy, "GET", TRASH, None, Authorization=header)
    assert d.would_forward, d.steps


def test_the_replay_memorys_refusal_becomes_the_identity_steps(policy: Policy) -> None:
    # The walk cannot see the replay memory: the server asks it between identify
    # and authorize, and a refusal turns the identity step into a 401.
    d = walk.Decision("GET", TRASH)
    headers = CIMultiDict({"Authorization": sdk_header(), "Host": "gw"})
    walk.locate(d, headers, policy)
    walk.identify(d, headers, None, policy, verifier_for(policy), time.time())
    with pytest.raises(Unauthorized):
        walk.refuse_identity(d, Unauthorized("hmac reused (DuplicatedSignature): ..."))
    assert d.error is not None and d.error.code == "Unauthorized"
    assert [(s.name, s.ok) for s in d.steps] == [("target", True), ("identity", False)]
    assert not d.would_forward
