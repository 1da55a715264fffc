"""The records API under the shipped policy, and the policy language it needs.

``params`` (a path segment must match a pattern) and ``rules`` (a body field
raises the role a request needs): how they load, how they decide, and every
route of ``config/policy.yaml`` allowed and denied at the right roles, first
as a pure decision, then through a real gateway in front of the sandbox.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from support import REPO, Creds, GatewayProc, Reply, SandboxProc, policy_from_text

from gateway import walk
from gateway.identity import verifier_for
from gateway.policy import Policy
from gateway.routes import Condition, same_json
from gateway.sandbox import demo_record_id
from gateway.yamlsource import ConfigError

ROLES = ("VIEWER", "MEMBER", "OWNER")
ID = "CRMRC2026112800000000ABCDEF12345"
BULK_RESTORE = "/crm-core/v1/records/bulk/restore"
BULK_DELETE = "/crm-core/v1/records/bulk/delete"
TRASH = "/crm-core/v1/records/trash"
TRUSTED = """
trusted_headers:
  principal: X-P
  role: X-R
  sources: ["127.0.0.1/32"]
"""
# name, method, path, body, lowest role allowed
SHIPPED_ROUTES = [
    ("records-bulk-restore", "POST", BULK_RESTORE, {"recordIds": [ID]}, "MEMBER"),
    ("records-bulk-delete", "POST", BULK_DELETE, {"recordIds": [ID]}, "MEMBER"),
    ("record-delete", "DELETE", f"/crm-core/v1/records/{ID}", None, "MEMBER"),
    ("record-restore", "POST", f"/crm-core/v1/records/{ID}/restore", None, "MEMBER"),
    ("records-trash", "GET", f"{TRASH}?limit=5&offset=0", None, "VIEWER"),
]


def problems_of(text: str) -> list[str]:
    """What is wrong with a policy file holding ``text``."""
    with pytest.raises(ConfigError) as info:
        policy_from_text(text)
    return [str(p) for p in info.value.problems]


def shipped(path: str = "config/policy.yaml") -> Policy:
    """A shipped policy file, given TRUSTED headers where it has none of its own."""
    text = (REPO / path).read_text()
    if "\ntrusted_headers:" not in text:
        text += TRUSTED
    return policy_from_text(text, path)


def decide(
    policy: Policy,
    method: str,
    target: str,
    role: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> walk.Decision:
    headers = CIMultiDict({"X-P": "someone", "X-R": role})
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    if data:
        headers["Content-Type"] = content_type
    return walk.decide(
        method,
        target,
        headers,
        "127.0.0.1",
        data,
        policy,
        verifier_for(policy),
        time.time(),
        1 << 20,
    )


def refusal(d: walk.Decision) -> str | None:
    return None if d.error is None else d.error.code


# --- the shipped policies -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["config/policy.yaml", "config/demo/policy.yaml"])
def test_the_shipped_policies_hold_the_records_family(path: str) -> None:
    routes = [(r.name, r.method, r.path, r.min_role) for r in shipped(path).routes]
    records = [
        ("records-bulk-restore", "POST", BULK_RESTORE, "MEMBER"),
        ("records-bulk-delete", "POST", BULK_DELETE, "MEMBER"),
        ("record-delete", "DELETE", "/crm-core/v1/records/{recordId}", "MEMBER"),
        ("record-restore", "POST", "/crm-core/v1/records/{recordId}/restore", "MEMBER"),
        ("records-trash", "GET", TRASH, "VIEWER"),
    ]
    demo_only = [("cash-balance", "GET", "/cash/v1/balance", "VIEWER")]
    assert routes == (records + demo_only if "demo" in path else records)


@pytest.mark.parametrize(("name", "method", "target", "body", "lowest"), SHIPPED_ROUTES)
@pytest.mark.parametrize("role", ROLES)
def test_each_shipped_route_is_allowed_from_its_role_up(
    name: str, method: str, target: str, body: Any, lowest: str, role: str
) -> None:
    d = decide(shipped(), method, target, role, body)
    assert d.route_name == name
    if ROLES.index(role) >= ROLES.index(lowest):
        assert d.would_forward, d.steps
    else:
        assert refusal(d) == "Forbidden"
        assert [s.name for s in d.steps][-1] == "role"


@pytest.mark.parametrize(
    ("extra", "needs"),
    [
        ({}, "MEMBER"),
        ({"permanent": False}, "MEMBER"),
        ({"permanent": True}, "OWNER"),
        # Fail closed: whatever upstream might read as "yes" needs OWNER as well.
        ({"permanent": "true"}, "OWNER"),
        ({"permanent": 1}, "OWNER"),
        ({"permanent": None}, "OWNER"),
        ({"permanent": "false"}, "OWNER"),
        ({"permanent": [False]}, "OWNER"),
    ],
)
@pytest.mark.parametrize("role", ROLES)
def test_permanent_bulk_delete_needs_owner(extra: dict[str, Any], needs: str, role: str) -> None:
    d = decide(shipped(), "POST", BULK_DELETE, role, {"recordIds": [ID], **extra})
    if ROLES.index(role) >= ROLES.index(needs):
        assert d.would_forward, d.steps
    else:
        assert refusal(d) == "Forbidden"
        assert d.error is not None
        failed = d.steps[-1]
        # A VIEWER is stopped by the route's min_role, a MEMBER by the rule.
        assert failed.name == ("role" if role == "VIEWER" else "rules")
        if role == "MEMBER":
            assert "OWNER" in d.error.message and "permanent" in d.error.message


@pytest.mark.parametrize(
    "member", ["Permanent", "PERMANENT", "permanent ", " permanent", "permanent\u0000", "perm"]
)
@pytest.mark.parametrize("role", ["MEMBER", "OWNER"])
def test_a_member_the_delete_does_not_list_is_refused_for_everyone(member: str, role: str) -> None:
    # Another key to the gateway, and perhaps "permanent" to a lenient reader behind it.
    d = decide(shipped(), "POST", BULK_DELETE, role, {"recordIds": [ID], member: True})
    assert refusal(d) == "InvalidBody"
    assert d.steps[-1].name == "body"
    assert d.error is not None  # the caller's key is not echoed: it may hold anything
    assert d.error.message == (
        "The body holds a member this route does not take (it takes: permanent, recordIds)."
    )


@pytest.mark.parametrize("path", ["config/policy.yaml", "config/demo/policy.yaml"])
def test_every_shipped_route_lists_its_query_and_every_batch_route_its_fields(
    path: str,
) -> None:
    for route in shipped(path).routes:
        assert route.query is not None, f"{route.name} takes any query"
        if route.batch is not None:
            assert route.fields is not None, f"{route.name} takes any member"
    routes = {r.name: r for r in shipped(path).routes}
    # What SOLAPI documents for the restore, and what the delete reads besides.
    assert routes["records-bulk-restore"].fields == ("recordIds",)
    assert routes["records-bulk-delete"].fields == ("recordIds", "permanent")
    assert routes["records-trash"].query is not None
    assert set(routes["records-trash"].query) == {"limit", "offset"}


@pytest.mark.parametrize(
    ("method", "target", "role"),
    [
        ("POST", BULK_DELETE + "?permanent=true", "MEMBER"),
        ("POST", BULK_DELETE + "?permanent=true", "OWNER"),
        ("DELETE", f"/crm-core/v1/records/{ID}?permanent=true", "OWNER"),
        ("POST", BULK_RESTORE + "?x=1", "MEMBER"),
        ("GET", TRASH + "?limit=5&limit=6", "VIEWER"),
        ("GET", TRASH + "?limit=5;permanent=true", "VIEWER"),
        ("GET", TRASH + "?limit=%35", "VIEWER"),
        ("GET", TRASH + "?Limit=5", "VIEWER"),
        ("GET", TRASH + "?limit", "VIEWER"),
        ("GET", TRASH + "?limit=5&", "VIEWER"),
        ("GET", TRASH + "?limit=-1", "VIEWER"),
    ],
)
def test_a_query_the_route_does_not_list_is_refused(method: str, target: str, role: str) -> None:
    body = {"recordIds": [ID]} if method == "POST" and "bulk" in target else None
    d = decide(shipped(), method, target, role, body)
    assert refusal(d) == "InvalidQuery"
    assert d.steps[-1].name == "query"


def test_the_trash_takes_limit_and_offset_as_digits() -> None:
    policy = shipped()
    for target in (TRASH, TRASH + "?limit=5", TRASH + "?offset=10&limit=1000", TRASH + "?"):
        assert decide(policy, "GET", target, "VIEWER").would_forward, target


def test_a_rule_is_judged_after_the_batch_is_valid() -> None:
    body = {"recordIds": ["not-an-id"], "permanent": True}
    d = decide(shipped(), "POST", BULK_DELETE, "MEMBER", body)
    assert refusal(d) == "InvalidItem"
    assert d.steps[-1].name == "body"


def test_a_duplicated_permanent_key_is_invalid_json_not_a_coin_toss() -> None:
    raw = f'{{"recordIds": ["{ID}"], "permanent": false, "permanent": true}}'.encode()
    d = decide(shipped(), "POST", BULK_DELETE, "OWNER", raw=raw)
    assert refusal(d) == "InvalidJSON"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/crm-core/v1/records/not-an-id"),
        ("DELETE", "/crm-core/v1/records/trash"),  # the exact route is GET only
        ("DELETE", f"/crm-core/v1/records/{ID}x"),
        ("DELETE", f"/crm-core/v1/records/{ID.lower()}"),
        ("POST", "/crm-core/v1/records/CRMRC1/restore"),
    ],
)
def test_a_record_id_in_the_path_is_checked_after_the_role(method: str, path: str) -> None:
    policy = shipped()
    member = decide(policy, method, path, "MEMBER")
    assert refusal(member) == "InvalidItem"
    assert member.error is not None and member.error.details == {"param": "recordId"}
    assert member.steps[-1].name == "params"
    # Matching stays structural: the route is found, so a VIEWER hears 403, not 400.
    viewer = decide(policy, method, path, "VIEWER")
    assert refusal(viewer) == "Forbidden"
    assert viewer.route_name == member.route_name != "unmatched"


def test_other_methods_on_record_paths_are_405() -> None:
    d = decide(shipped(), "GET", f"/crm-core/v1/records/{ID}", "OWNER")
    assert refusal(d) == "MethodNotAllowed"
    assert d.error is not None and d.error.headers["Allow"] == "DELETE"
    d = decide(shipped(), "POST", TRASH, "OWNER")
    assert d.error is not None and d.error.headers["Allow"] == "GET, DELETE"


# --- rules on a route without a batch ---------------------------------------------------

RULED = (
    """\
roles: [VIEWER, MEMBER, OWNER]
routes:
  - name: purge-one
    method: DELETE
    path: /r/{id}
    min_role: MEMBER
    rules:
      - when: {field: mode, equals: hard}
        min_role: OWNER
      - when: {field: count, equals: 3}
        min_role: OWNER
"""
    + TRUSTED
)


@pytest.mark.parametrize(
    ("raw", "content_type", "member", "owner"),
    [
        (b"", "application/json", None, None),  # no body: no field, no rule applies
        (b'{"mode": "soft"}', "application/json", None, None),
        (b'{"mode": "hard"}', "application/json", "Forbidden", None),
        (b'{"count": 3.0}', "application/json", "Forbidden", None),  # 3 and 3.0: one number
        (b'{"count": "3"}', "application/json", None, None),
        (b"not json", "application/json", "InvalidJSON", "InvalidJSON"),
        (b'{"mode": "hard", "mode": "x"}', "application/json", "InvalidJSON", "InvalidJSON"),
        (b'["mode", "hard"]', "application/json", "InvalidBody", "InvalidBody"),
        (b'{"mode": "hard"}', "text/plain", "UnsupportedMediaType", "UnsupportedMediaType"),
    ],
)
def test_rules_parse_any_body_they_judge(
    raw: bytes, content_type: str, member: str | None, owner: str | None
) -> None:
    policy = policy_from_text(RULED)
    for role, expected in (("MEMBER", member), ("OWNER", owner)):
        d = decide(policy, "DELETE", "/r/1", role, raw=raw, content_type=content_type)
        assert refusal(d) == expected, (role, d.steps)


def test_json_equality_is_typed() -> None:
    assert same_json(True, True) and not same_json(1, True) and not same_json(True, 1)
    assert same_json(1, 1.0) and same_json(0, 0) and not same_json(0, False)
    assert same_json(None, None) and not same_json("null", None) and not same_json(0, None)
    assert not same_json([True], True) and not same_json({"a": 1}, "a")
    condition = Condition(field="permanent", not_equals=False)
    assert str(condition) == "permanent is not false"
    assert not condition.holds({}) and not condition.holds(None)
    assert condition.holds({"permanent": 0}) and not condition.holds({"permanent": False})


# --- loading: every mistake named by file, line and key ------------------------------------


def route_with(extra: str, path: str = "/r/{id}") -> str:
    return (
        "roles: [VIEWER, MEMBER, OWNER]\n"
        "routes:\n"
        "  - name: r\n"
        "    method: POST\n"
        f"    path: {path}\n"
        "    min_role: MEMBER\n" + extra
    )


@pytest.mark.parametrize(
    ("extra", "path", "problem"),
    [
        (
            "    rules:\n      - when: {field: permanent, equals: true}\n        min_role: ADMIN\n",
            "/r/{id}",
            "policy.yaml:9: routes[0].rules[0].min_role: unknown role 'ADMIN'",
        ),
        (
            "    rules:\n      - when: {field: permanent, equals: true}\n"
            "        min_role: MEMBER\n",
            "/r/{id}",
            "policy.yaml:9: routes[0].rules[0].min_role: must be above the route's min_role"
            " (MEMBER), or the rule changes nothing",
        ),
        (
            "    rules:\n      - when: {field: permanent, is: true}\n        min_role: OWNER\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].rules[0].when.is: unknown key (allowed: equals, field,"
            " not_equals)",
        ),
        (
            "    rules:\n      - when: {field: p, equals: 1, not_equals: 2}\n"
            "        min_role: OWNER\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].rules[0].when: give exactly one of equals, not_equals",
        ),
        (
            "    rules:\n      - when: {field: p}\n        min_role: OWNER\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].rules[0].when: give exactly one of equals, not_equals",
        ),
        (
            "    rules:\n      - when: {field: p, equals: [1, 2]}\n        min_role: OWNER\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].rules[0].when.equals: must be one value",
        ),
        (
            "    rules:\n      - when: {field: '', equals: 1}\n        min_role: OWNER\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].rules[0].when.field: is empty",
        ),
        (
            "    rules:\n      - min_role: OWNER\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].rules[0].when: required key is missing",
        ),
        (
            "    rules:\n      - when: {field: p, equals: 1}\n        min_role: OWNER\n"
            "        because: reasons\n",
            "/r/{id}",
            "policy.yaml:10: routes[0].rules[0].because: unknown key (allowed: min_role, when)",
        ),
        (
            "    rules: {when: {field: p, equals: 1}, min_role: OWNER}\n",
            "/r/{id}",
            "policy.yaml:7: routes[0].rules: must be a list",
        ),
        (
            "    params:\n      recordId: '^x$'\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].params.recordId: unknown key (allowed: id)",
        ),
        (
            "    params:\n      id: '^(x$'\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].params.id: bad regex",
        ),
        (
            "    params:\n      id: 7\n",
            "/r/{id}",
            "policy.yaml:8: routes[0].params.id: must be a string",
        ),
        (
            "    params:\n      id: '^x$'\n",
            "/r/plain",
            "policy.yaml:8: routes[0].params: the path has no {name} segment to check",
        ),
        (
            "    params: {}\n",
            "/r/{id}",
            "policy.yaml:7: routes[0].params: name at least one {placeholder}",
        ),
    ],
)
def test_rule_and_param_mistakes_are_named_by_line_and_key(
    extra: str, path: str, problem: str
) -> None:
    problems = problems_of(route_with(extra, path))
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem), problems


def test_good_rules_and_params_load() -> None:
    text = route_with(
        "    params:\n      id: '^[0-9]+$'\n"
        "    rules:\n"
        "      - when: {field: mode, equals: hard}\n        min_role: OWNER\n"
        "      - when: {field: n, not_equals: null}\n        min_role: OWNER\n"
        "      - when: {field: x, equals: -1.5}\n        min_role: OWNER\n",
        "/r/{id}/do",
    )
    policy = policy_from_text(text)
    route = policy.routes[0]
    rules = [(p.name, p.index, p.pattern.pattern) for p in route.param_rules]
    assert rules == [("id", 2, "^[0-9]+$")]
    assert [(str(r.when), r.min_role) for r in route.rules] == [
        ("mode is 'hard'", "OWNER"),
        ("n is not null", "OWNER"),
        ("x is -1.5", "OWNER"),
    ]


# --- end to end: a real gateway on the shipped policy, in front of the sandbox ------------

e2e = pytest.mark.e2e


def bearer(creds: Creds, role: str, **extra: str) -> dict[str, str]:
    return {"Authorization": creds.bearer(role), "Content-Type": "application/json", **extra}


async def send(
    gateway: GatewayProc,
    session: aiohttp.ClientSession,
    method: str,
    target: str,
    headers: dict[str, str],
    body: Any = None,
) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    return await gateway.send(session, method, target, headers=headers, data=data)


def assert_refused(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["X-Gateway-Error"] == code
    answer: dict[str, Any] = reply.json()
    assert answer["errorCode"] == code
    return answer


def assert_forwarded(reply: Reply, sandbox: SandboxProc, method: str, target: str) -> Any:
    assert reply.status == 200, reply.body
    assert "X-Gateway-Error" not in reply.headers
    seen = sandbox.last()
    assert seen["verified"] is True
    assert (seen["method"], seen["path"]) == (method, target.partition("?")[0])
    return reply.json()


@e2e
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", [r[0] for r in SHIPPED_ROUTES])
async def test_every_shipped_route_end_to_end(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    name: str,
    role: str,
) -> None:
    _, method, target, body, lowest = next(r for r in SHIPPED_ROUTES if r[0] == name)
    record = sandbox.trash_ids(1)[0]  # a record in the trash, for this test only
    target = target.replace(ID, record)
    if body is not None:
        body = {"recordIds": [record]}
    headers = bearer(creds, role)

    if ROLES.index(role) < ROLES.index(lowest):
        with sandbox.untouched():
            reply = await send(shipped_gateway, http_session, method, target, headers, body)
        assert_refused(reply, 403, "Forbidden")
        return
    reply = await send(shipped_gateway, http_session, method, target, headers, body)
    answer = assert_forwarded(reply, sandbox, method, target)
    expected = {
        "records-bulk-restore": "restored",
        "records-bulk-delete": "alreadyDeleted",  # it is in the trash already
        "record-delete": "alreadyDeleted",
        "record-restore": "restored",
    }
    if name == "records-trash":
        assert (answer["limit"], answer["offset"], len(answer["records"])) == (5, 0, 5)
    elif body is not None:
        assert answer["results"] == [{"recordId": record, "result": expected[name]}]
    else:
        assert answer == {"recordId": record, "result": expected[name]}


@e2e
@pytest.mark.parametrize(
    ("role", "permanent", "outcome"),
    [
        ("MEMBER", True, "Forbidden"),
        ("MEMBER", "true", "Forbidden"),
        ("VIEWER", True, "Forbidden"),
        ("OWNER", True, "purged"),
        ("MEMBER", False, "deleted"),
        ("OWNER", False, "deleted"),
    ],
)
async def test_permanent_bulk_delete_end_to_end(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    role: str,
    permanent: Any,
    outcome: str,
) -> None:
    # An active record of this test's own: restore one from the trash first.
    record = sandbox.trash_ids(1)[0]
    restore = {"recordIds": [record]}
    reply = await send(
        shipped_gateway, http_session, "POST", BULK_RESTORE, bearer(creds, "MEMBER"), restore
    )
    assert reply.json()["results"][0]["result"] == "restored"
    body = {"recordIds": [record], "permanent": permanent}

    if outcome == "Forbidden":
        with sandbox.untouched():
            reply = await send(
                shipped_gateway, http_session, "POST", BULK_DELETE, bearer(creds, role), body
            )
        answer = assert_refused(reply, 403, "Forbidden")
        if role == "MEMBER":
            assert "OWNER" in answer["errorMessage"]
        return
    reply = await send(
        shipped_gateway, http_session, "POST", BULK_DELETE, bearer(creds, role), body
    )
    answer = assert_forwarded(reply, sandbox, "POST", BULK_DELETE)
    assert answer["results"] == [{"recordId": record, "result": outcome}]
    # What was deleted for good cannot come back; what went to the trash can.
    again = await send(
        shipped_gateway,
        http_session,
        "POST",
        f"/crm-core/v1/records/{record}/restore",
        bearer(creds, "MEMBER"),
    )
    assert again.json()["result"] == ("purged" if outcome == "purged" else "restored")


@e2e
@pytest.mark.parametrize(
    ("role", "method", "target", "status", "code"),
    [
        ("MEMBER", "DELETE", "/crm-core/v1/records/not-a-record", 400, "InvalidItem"),
        ("MEMBER", "DELETE", TRASH, 400, "InvalidItem"),
        ("MEMBER", "POST", "/crm-core/v1/records/CRMRC1/restore", 400, "InvalidItem"),
        ("VIEWER", "DELETE", "/crm-core/v1/records/not-a-record", 403, "Forbidden"),
        ("OWNER", "GET", f"/crm-core/v1/records/{ID}", 405, "MethodNotAllowed"),
        ("OWNER", "GET", "/crm-core/v1/records", 404, "RouteNotFound"),
    ],
)
async def test_record_paths_are_checked_before_upstream(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
    role: str,
    method: str,
    target: str,
    status: int,
    code: str,
) -> None:
    with sandbox.untouched():
        reply = await send(shipped_gateway, http_session, method, target, bearer(creds, role))
    answer = assert_refused(reply, status, code)
    if code == "InvalidItem":
        assert answer["details"] == {"param": "recordId"}
    line = shipped_gateway.access_lines()[-1]
    route = "record-restore" if target.endswith("/restore") else "record-delete"
    assert (line["status"], line["errorCode"]) == (status, code)
    # Only a request whose method and path both match a route is labelled with it.
    assert line["route"] == (route if status != 404 and status != 405 else "unmatched")


@e2e
async def test_a_permanent_delete_smuggled_in_a_duplicate_key_is_refused(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    record = demo_record_id("ALIVE", 1)
    raw = f'{{"recordIds": ["{record}"], "permanent": false, "permanent": true}}'.encode()
    with sandbox.untouched():
        reply = await shipped_gateway.send(
            http_session, "POST", BULK_DELETE, headers=bearer(creds, "MEMBER"), data=raw
        )
    assert_refused(reply, 400, "InvalidJSON")
