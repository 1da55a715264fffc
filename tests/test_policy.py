"""Policy decisions: which route a request is, and whether the caller's role may use it."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import REPO, policy_from_text

from gateway.errors import Forbidden, MethodNotAllowed, RouteNotFound
from gateway.names import METHODS
from gateway.policy import Policy
from gateway.routes import Route
from gateway.signing import Secret

RESTORE = "/crm-core/v1/records/bulk/restore"

POLICY = f"""\
roles: [VIEWER, MEMBER, OWNER]
principals:
  - name: reader
    role: VIEWER
    token_sha256: "{hashlib.sha256(b"reader-token").hexdigest()}"
  - name: billing-svc
    role: MEMBER
    token_sha256: "{hashlib.sha256(b"billing-token").hexdigest().upper()}"
  - name: sdk-svc
    role: OWNER
    hmac_key: "NCSINTERNAL00001"
    hmac_secret: "internal-secret-1"
trusted_headers:
  principal: X-Internal-Principal
  role: X-Internal-Role
  sources: ["127.0.0.1/32", "10.20.0.0/16", "::1/128", "fd00:1234::/32", "fe80::/10"]
routes:
  - name: records-bulk-restore
    method: POST
    path: {RESTORE}
    min_role: MEMBER
    batch:
      field: recordIds
      max_items: 1000
      item_pattern: "^CRMRC[0-9]{{16}}[0-9A-Za-z]{{11}}$"
  - name: records-list
    method: GET
    path: /crm-core/v1/records
    min_role: VIEWER
  - name: records-trash
    method: GET
    path: /crm-core/v1/records/trash
    min_role: VIEWER
  - name: record-get
    method: GET
    path: /crm-core/v1/records/{{id}}
    min_role: VIEWER
  - name: record-delete
    method: DELETE
    path: /crm-core/v1/records/{{id}}
    min_role: OWNER
  - name: record-restore
    method: POST
    path: /crm-core/v1/records/{{id}}/restore
    min_role: MEMBER
  - name: field-get
    method: GET
    path: /crm-core/v1/records/{{id}}/fields/{{field}}
    min_role: VIEWER
  - name: root
    method: GET
    path: /
    min_role: VIEWER
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return policy_from_text(POLICY)


# --- match: which route ------------------------------------------------------------


def test_an_exact_path_matches_its_route(policy: Policy) -> None:
    route = policy.match("POST", RESTORE)
    assert route.name == "records-bulk-restore"
    assert route.min_role == "MEMBER"
    assert route.batch is not None
    assert route.batch.field == "recordIds"
    assert route.batch.max_items == 1000
    assert route.batch.unique is True  # the default
    assert route.batch.item_pattern is not None
    assert route.batch.item_pattern.fullmatch("CRMRC" + "1" * 16 + "a" * 11)


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/crm-core/v1/records", "records-list"),
        ("GET", "/crm-core/v1/records/CRMRC1", "record-get"),
        ("GET", "/crm-core/v1/records/a.b-c_d~e:f@g", "record-get"),
        ("DELETE", "/crm-core/v1/records/CRMRC1", "record-delete"),
        ("POST", "/crm-core/v1/records/CRMRC1/restore", "record-restore"),
        ("GET", "/crm-core/v1/records/CRMRC1/fields/name", "field-get"),
        ("GET", "/", "root"),
    ],
)
def test_templates_match_one_whole_segment(
    policy: Policy, method: str, path: str, name: str
) -> None:
    assert policy.match(method, path).name == name


def test_an_exact_route_is_preferred_over_a_template(policy: Policy) -> None:
    assert policy.match("GET", "/crm-core/v1/records/trash").name == "records-trash"
    assert policy.match("GET", "/crm-core/v1/records/trasH").name == "record-get"
    # The exact path serves only GET; another method can still reach the template.
    assert policy.match("DELETE", "/crm-core/v1/records/trash").name == "record-delete"


def test_a_template_matches_the_bulk_path_only_where_no_route_is_exact() -> None:
    policy = policy_from_text(
        "roles: [VIEWER]\nroutes:\n"
        "  - {name: any-action, method: POST, path: '/r/{id}/{action}', min_role: VIEWER}\n"
        "  - {name: bulk-restore, method: POST, path: /r/bulk/restore, min_role: VIEWER}\n"
    )
    assert policy.match("POST", "/r/bulk/restore").name == "bulk-restore"
    assert policy.match("POST", "/r/bulk/delete").name == "any-action"


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/crm-core",
        "/crm-core/v1",
        RESTORE + "/",
        RESTORE.upper(),
        "/crm-core/v1/records/bulk/Restore",
        "/CRM-core/v1/records",
        RESTORE + ";jsessionid=1",
        "/crm-core/v1/records;x",
        "/crm-core/v1/records/",  # an empty {id} segment
        "/crm-core/v1/records//restore",
        "/crm-core/v1/records/x/restore/",
        "/crm-core/v1/records/x/y/restore",
        "/crm-core/v1/records/x/fields/",
        "//",
        "/crm-core//v1/records",
        "crm-core/v1/records",
        RESTORE + "?x=1",
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_any_other_path_is_not_found(policy: Policy, method: str, path: str) -> None:
    with pytest.raises(RouteNotFound) as info:
        policy.match(method, path)
    assert info.value.status == 404
    assert info.value.code == "RouteNotFound"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", RESTORE, "POST"),
        ("DELETE", RESTORE, "POST"),
        ("post", RESTORE, "POST"),  # methods are case-sensitive too
        ("POST", "/crm-core/v1/records", "GET"),
        ("PUT", "/crm-core/v1/records/CRMRC1", "GET, DELETE"),
        ("PUT", "/crm-core/v1/records/trash", "GET, DELETE"),
        ("GET", "/crm-core/v1/records/CRMRC1/restore", "POST"),
    ],
)
def test_a_known_path_with_another_method_is_405_with_allow(
    policy: Policy, method: str, path: str, allow: str
) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        policy.match(method, path)
    assert info.value.status == 405
    assert info.value.code == "MethodNotAllowed"
    assert info.value.headers == {"Allow": allow}
    assert info.value.body()["errorCode"] == "MethodNotAllowed"


def test_an_empty_policy_denies_everything() -> None:
    policy = policy_from_text("roles: [VIEWER]\nroutes: []\n")
    for path in ("/", RESTORE):
        with pytest.raises(RouteNotFound):
            policy.match("GET", path)


# --- property tests ----------------------------------------------------------------

SEGMENT = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/"),
    min_size=1,
    max_size=12,
)
PATHS = st.lists(st.text(max_size=10), min_size=1, max_size=7).map("/".join)


# The module-scoped fixture is built once, so hypothesis may share it between examples.
@given(path=PATHS, method=st.sampled_from(METHODS))
def test_any_path_outside_crm_core_is_not_found(policy: Policy, path: str, method: str) -> None:
    if path == "/" or path.startswith("/crm-core/"):
        path = "/elsewhere" + path
    with pytest.raises(RouteNotFound):
        policy.match(method, path)


@given(record_id=SEGMENT)
def test_any_one_segment_id_matches_the_templates(policy: Policy, record_id: str) -> None:
    base = f"/crm-core/v1/records/{record_id}"
    assert policy.match("POST", base + "/restore").name == "record-restore"
    assert policy.match("DELETE", base).name == "record-delete"
    expected = "records-trash" if record_id == "trash" else "record-get"
    assert policy.match("GET", base).name == expected


@given(
    suffix=st.sampled_from(["/", ";", ";v=1", "%2F", ".", "?", "#"]) | SEGMENT.map("/".__add__),
    method=st.sampled_from(METHODS),
)
def test_any_extension_of_the_bulk_path_is_not_found(
    policy: Policy, suffix: str, method: str
) -> None:
    with pytest.raises(RouteNotFound):
        policy.match(method, RESTORE + suffix)


EXACT = [("POST", RESTORE), ("GET", "/crm-core/v1/records"), ("GET", "/crm-core/v1/records/trash")]


@given(exact=st.sampled_from(EXACT), data=st.data())
def test_changing_the_case_of_any_letter_makes_another_path(
    policy: Policy, exact: tuple[str, str], data: st.DataObject
) -> None:
    method, path = exact
    i = data.draw(st.sampled_from([i for i, c in enumerate(path) if c.isalpha()]))
    changed = path[:i] + path[i].swapcase() + path[i + 1 :]
    try:
        route = policy.match(method, changed)
    except (RouteNotFound, MethodNotAllowed):
        return
    # Only a letter inside what a template sees as {id} may change and still match.
    assert "{id}" in route.path


# --- authorize: the role ladder ----------------------------------------------------


@pytest.mark.parametrize(
    ("route_path", "method", "role", "allowed"),
    [
        (RESTORE, "POST", "VIEWER", False),
        (RESTORE, "POST", "MEMBER", True),
        (RESTORE, "POST", "OWNER", True),
        ("/crm-core/v1/records", "GET", "VIEWER", True),
        ("/crm-core/v1/records/x", "DELETE", "MEMBER", False),
        ("/crm-core/v1/records/x", "DELETE", "OWNER", True),
        (RESTORE, "POST", "member", False),  # roles are case-sensitive
        (RESTORE, "POST", "ADMIN", False),  # a role the policy does not know
        (RESTORE, "POST", "", False),
    ],
)
def test_authorize_follows_the_role_ladder(
    policy: Policy, route_path: str, method: str, role: str, allowed: bool
) -> None:
    route = policy.match(method, route_path)
    if allowed:
        policy.authorize(route, role)
    else:
        with pytest.raises(Forbidden) as info:
            policy.authorize(route, role)
        assert info.value.status == 403
        assert info.value.code == "Forbidden"
        assert route.min_role in info.value.message


def test_the_ladder_is_the_order_roles_are_listed_in() -> None:
    policy = policy_from_text(
        "roles: [guest, ops, admin]\n"
        "routes:\n  - {name: deploy, method: POST, path: /deploy, min_role: ops}\n"
    )
    route = policy.match("POST", "/deploy")
    assert policy.rank == {"guest": 0, "ops": 1, "admin": 2}
    with pytest.raises(Forbidden):
        policy.authorize(route, "guest")
    policy.authorize(route, "ops")
    policy.authorize(route, "admin")


# --- trusted headers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("10.20.255.254", True),
        ("10.21.0.1", False),
        ("::1", True),
        ("0:0:0:0:0:0:0:1", True),
        ("::2", False),
        ("fd00:1234:abcd::7", True),
        ("fd00:1235::7", False),
        ("fe80::1%eth0", True),  # a link-local peer carries its zone
        ("203.0.113.5", False),
        (None, False),
        ("", False),
        ("garbage", False),
        ("127.0.0.1:8080", False),
        ("[::1]", False),
        ("127.0.0.1/32", False),
    ],
)
def test_trusted_headers_trust_only_peers_in_sources(
    policy: Policy, peer: str | None, trusted: bool
) -> None:
    assert policy.trusted_headers is not None
    assert policy.trusted_headers.trusts(peer) is trusted


def test_trusted_headers_are_read_from_the_policy(policy: Policy) -> None:
    t = policy.trusted_headers
    assert t is not None
    assert (t.principal, t.role) == ("X-Internal-Principal", "X-Internal-Role")
    assert [str(n) for n in t.sources] == [
        "127.0.0.1/32",
        "10.20.0.0/16",
        "::1/128",
        "fd00:1234::/32",
        "fe80::/10",
    ]


def test_without_trusted_headers_the_feature_is_off() -> None:
    assert policy_from_text("roles: [VIEWER]\nroutes: []\n").trusted_headers is None


# --- lookup tables -----------------------------------------------------------------


def test_principals_are_found_by_the_sha256_of_their_token(policy: Policy) -> None:
    def by_token(token: str) -> str:
        return policy.by_token[hashlib.sha256(token.encode()).hexdigest()].name

    assert by_token("reader-token") == "reader"
    # The policy wrote this hash in upper case; lookups use hexdigest()'s lower case.
    assert by_token("billing-token") == "billing-svc"
    assert hashlib.sha256(b"sdk-svc").hexdigest() not in policy.by_token
    assert len(policy.by_token) == 2


def test_principals_are_found_by_their_internal_key(policy: Policy) -> None:
    principal = policy.by_hmac_key["NCSINTERNAL00001"]
    assert (principal.name, principal.role) == ("sdk-svc", "OWNER")
    assert principal.hmac_secret == Secret("internal-secret-1")
    assert principal.token_sha256 is None
    assert list(policy.by_hmac_key) == ["NCSINTERNAL00001"]
    assert "internal-secret-1" not in repr(policy)


def test_an_empty_principals_list_is_allowed() -> None:
    policy = policy_from_text("roles: [VIEWER]\nprincipals: []\nroutes: []\n")
    assert policy.principals == ()
    assert dict(policy.by_token) == {}
    assert dict(policy.by_hmac_key) == {}


# --- the shipped policies ----------------------------------------------------------


@pytest.mark.parametrize("path", ["config/policy.yaml", "config/demo/policy.yaml"])
def test_the_shipped_policies_serve_bulk_restore_to_members(path: str) -> None:
    policy = policy_from_text((REPO / path).read_text(), path)
    route = policy.match("POST", RESTORE)
    assert isinstance(route, Route)
    assert route.name == "records-bulk-restore"
    assert policy.roles == ("VIEWER", "MEMBER", "OWNER")
    with pytest.raises(Forbidden):
        policy.authorize(route, "VIEWER")
    policy.authorize(route, "MEMBER")
    with pytest.raises(MethodNotAllowed) as info:
        policy.match("GET", RESTORE)
    assert info.value.headers["Allow"] == "POST"
    with pytest.raises(RouteNotFound):
        policy.match("POST", "/crm-core/v1/records")
