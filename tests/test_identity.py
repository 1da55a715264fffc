"""gateway/identity.py: who is calling, decided without a network."""

from __future__ import annotations

import hashlib
import ipaddress
import time
from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict

from gateway import signing
from gateway.errors import Unauthorized
from gateway.identity import Caller, PeerCert, identify, peer_cert, verifier_for
from gateway.policy import Policy
from gateway.principals import CertMatch, Principal, TrustedHeaders
from gateway.signing import Secret

TOKENS = {"VIEWER": "viewer-token", "MEMBER": "member-token", "OWNER": "owner-token"}
HMAC_KEY, HMAC_SECRET = "NCSINTERNAL00001", "internal-secret"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_policy(trusted: bool = True) -> Policy:
    principals = [
        Principal(name=f"{role.lower()}-svc", role=role, token_sha256=sha(token))
        for role, token in TOKENS.items()
    ]
    principals.append(
        Principal(name="sdk-svc", role="MEMBER", hmac_key=HMAC_KEY, hmac_secret=Secret(HMAC_SECRET))
    )
    headers = (
        TrustedHeaders(
            principal="X-Internal-Principal",
            role="X-Internal-Role",
            sources=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        )
        if trusted
        else None
    )
    return Policy(
        roles=("VIEWER", "MEMBER", "OWNER"),
        principals=tuple(principals),
        trusted_headers=headers,
        routes=(),
    )


POLICY = make_policy()


def who(headers: dict[str, str] | list[tuple[str, str]], peer: str = "127.0.0.1") -> Caller:
    policy = POLICY
    return identify(CIMultiDict(headers), peer, policy, verifier_for(policy), time.time())


def refused(headers: dict[str, str] | list[tuple[str, str]], peer: str = "127.0.0.1") -> str:
    with pytest.raises(Unauthorized) as err:
        who(headers, peer)
    assert err.value.code == "Unauthorized" and err.value.status == 401
    assert err.value.reason
    return err.value.reason


@pytest.mark.parametrize("role", ["VIEWER", "MEMBER", "OWNER"])
def test_bearer_token_is_looked_up_by_its_hash(role: str) -> None:
    caller = who({"Authorization": f"Bearer {TOKENS[role]}"})
    assert caller == Caller(f"{role.lower()}-svc", role, "token")


def test_bearer_scheme_is_case_insensitive() -> None:
    assert who({"Authorization": f"bearer {TOKENS['MEMBER']}"}).role == "MEMBER"


@pytest.mark.parametrize(
    "value",
    ["Bearer nope", "Bearer ", "Bearer", "Basic dXNlcjpwYXNz", "Token x", "Bearer " + "a" * 5000],
)
def test_bad_authorization_is_401(value: str) -> None:
    refused({"Authorization": value})


def test_unknown_token_is_401_even_with_trusted_headers() -> None:
    reason = refused(
        {
            "Authorization": "Bearer nope",
            "X-Internal-Principal": "ops",
            "X-Internal-Role": "OWNER",
        }
    )
    assert "unknown bearer token" in reason


def test_authorization_wins_over_identity_headers() -> None:
    caller = who(
        {
            "Authorization": f"Bearer {TOKENS['VIEWER']}",
            "X-Internal-Principal": "ops",
            "X-Internal-Role": "OWNER",
        }
    )
    assert caller.role == "VIEWER"


def test_two_authorization_headers_are_401() -> None:
    token = f"Bearer {TOKENS['OWNER']}"
    refused([("Authorization", token), ("Authorization", token)])


def test_trusted_headers_from_a_trusted_peer() -> None:
    caller = who({"X-Internal-Principal": "ops-console", "X-Internal-Role": "OWNER"})
    assert caller == Caller("ops-console", "OWNER", "trusted-headers")
    caller = who({"x-internal-principal": "ops", "X-INTERNAL-ROLE": "VIEWER"}, peer="::1")
    assert caller.role == "VIEWER"


@pytest.mark.parametrize("peer", ["10.0.0.5", "127.0.0.2", "::2", None, "garbage"])
def test_trusted_headers_from_anywhere_else_are_401(peer: str | None) -> None:
    refused({"X-Internal-Principal": "ops", "X-Internal-Role": "OWNER"}, peer)  # type: ignore[arg-type]


def test_forwarded_for_does_not_make_a_peer_trusted() -> None:
    headers = {
        "X-Internal-Principal": "ops",
        "X-Internal-Role": "OWNER",
        "X-Forwarded-For": "127.0.0.1",
        "X-Real-IP": "127.0.0.1",
        "Forwarded": "for=127.0.0.1",
    }
    refused(headers, peer="10.1.2.3")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Internal-Principal": "ops"},
        {"X-Internal-Role": "OWNER"},
        {"X-Internal-Principal": "ops", "X-Internal-Role": "owner"},  # case-sensitive
        {"X-Internal-Principal": "ops", "X-Internal-Role": "ADMIN"},
        {"X-Internal-Principal": "", "X-Internal-Role": "OWNER"},
        {"X-Internal-Principal": "a b", "X-Internal-Role": "OWNER"},
        [
            ("X-Internal-Principal", "ops"),
            ("X-Internal-Role", "VIEWER"),
            ("X-Internal-Role", "OWNER"),
        ],
    ],
)
def test_incomplete_or_odd_identity_headers_are_401(
    headers: dict[str, str] | list[tuple[str, str]],
) -> None:
    refused(headers)


def test_no_trusted_headers_configured_means_they_count_for_nothing() -> None:
    policy = make_policy(trusted=False)
    headers = CIMultiDict({"X-Internal-Principal": "ops", "X-Internal-Role": "OWNER"})
    with pytest.raises(Unauthorized):
        identify(headers, "127.0.0.1", policy, verifier_for(policy), time.time())


def test_nothing_at_all_is_401() -> None:
    assert refused({}) == "no credentials"


# --- internal HMAC keys ---------------------------------------------------------


def sdk_header(secret: str = HMAC_SECRET, key: str = HMAC_KEY, skew_s: float = 0) -> str:
    date = signing.format_date(datetime.fromtimestamp(time.time() + skew_s, UTC))
    return signing.authorization(key, Secret(secret), date, signing.new_salt())


def test_internal_hmac_key_identifies_its_principal() -> None:
    header = sdk_header()
    caller = who({"Authorization": header})
    assert caller == Caller("sdk-svc", "MEMBER", "hmac", signing.parse(header))


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (sdk_header(secret="wrong"), "SignatureDoesNotMatch"),
        (sdk_header(key="NCSUNKNOWN000001"), "InvalidAPIKey"),
        (sdk_header(skew_s=3600), "RequestTimeTooSkewed"),
        ("HMAC-SHA256 apiKey=x", "Unauthorized"),
    ],
)
def test_bad_internal_signatures_are_401_with_the_reason_logged(header: str, code: str) -> None:
    assert code in refused({"Authorization": header})


def test_identity_checks_the_signature_and_leaves_the_salt_to_the_replay_memory() -> None:
    # Pure: the same header identifies twice here. The process's replay memory
    # (gateway/state.py, tests/test_state.py) refuses the second one.
    header = sdk_header()
    verifier = verifier_for(POLICY)
    for _ in range(2):
        caller = identify(
            CIMultiDict({"Authorization": header}), None, POLICY, verifier, time.time()
        )
        assert caller.signed is not None and caller.signed.salt == signing.parse(header).salt


def test_ipv4_mapped_peers_on_a_dual_stack_listener_are_matched_as_ipv4() -> None:
    caller = who({"X-Internal-Principal": "ops", "X-Internal-Role": "OWNER"}, "::ffff:127.0.0.1")
    assert caller.role == "OWNER"
    refused({"X-Internal-Principal": "ops", "X-Internal-Role": "OWNER"}, "::ffff:10.0.0.1")


# --- verified client certificates ------------------------------------------------------------

CERT_PRINCIPALS = (
    Principal(name="billing-svc", role="MEMBER", cert=CertMatch(uri="spiffe://corp/billing")),
    Principal(name="reports-svc", role="VIEWER", cert=CertMatch(dns="Reports.Internal")),
    Principal(name="ops-svc", role="OWNER", cert=CertMatch(cn="ops-svc")),
)
CERT_POLICY = POLICY.model_copy(update={"principals": POLICY.principals + CERT_PRINCIPALS})
BILLING = PeerCert(uris=("spiffe://corp/billing",), cns=("billing",))
STRANGER = PeerCert(uris=("spiffe://corp/stranger",), dns=("stranger.internal",))


def by_cert(
    cert: PeerCert | None, headers: dict[str, str] | None = None, peer: str = "127.0.0.1"
) -> Caller:
    policy = CERT_POLICY
    return identify(
        CIMultiDict(headers or {}), peer, policy, verifier_for(policy), time.time(), cert
    )


def cert_refused(cert: PeerCert, headers: dict[str, str] | None = None) -> str:
    with pytest.raises(Unauthorized) as err:
        by_cert(cert, headers)
    assert err.value.reason
    return err.value.reason


def test_a_verified_certificate_names_its_principal_by_uri_dns_or_cn() -> None:
    assert by_cert(BILLING) == Caller("billing-svc", "MEMBER", "cert")
    # DNS names match whatever their letter case; a URI or a CN only exactly.
    assert by_cert(PeerCert(dns=("reports.INTERNAL",))) == Caller("reports-svc", "VIEWER", "cert")
    assert by_cert(PeerCert(cns=("ops-svc",))) == Caller("ops-svc", "OWNER", "cert")
    assert "matches no principal" in cert_refused(PeerCert(uris=("SPIFFE://corp/billing",)))
    assert "matches no principal" in cert_refused(PeerCert(cns=("OPS-SVC",)))


def test_a_wildcard_name_in_a_certificate_is_not_expanded() -> None:
    assert "matches no principal" in cert_refused(PeerCert(dns=("*.internal",)))


def test_authorization_wins_over_a_certificate() -> None:
    caller = by_cert(BILLING, {"Authorization": f"Bearer {TOKENS['VIEWER']}"})
    assert caller == Caller("viewer-svc", "VIEWER", "token")
    # ... even when it is refused: the certificate is no fallback for a bad token.
    assert cert_refused(BILLING, {"Authorization": "Bearer nope"}) == "unknown bearer token"


def test_a_certificate_wins_over_trusted_headers() -> None:
    trusted = {"X-Internal-Principal": "ops", "X-Internal-Role": "OWNER"}
    assert by_cert(BILLING, trusted) == Caller("billing-svc", "MEMBER", "cert")


def test_a_certificate_naming_no_principal_leaves_it_to_the_trusted_headers() -> None:
    trusted = {"X-Internal-Principal": "ops", "X-Internal-Role": "OWNER"}
    assert by_cert(STRANGER, trusted) == Caller("ops", "OWNER", "trusted-headers")
    # From an untrusted peer the headers do not count, and neither does the certificate.
    with pytest.raises(Unauthorized):
        by_cert(STRANGER, trusted, peer="10.1.2.3")


def test_a_certificate_naming_no_principal_alone_is_401_naming_what_it_holds() -> None:
    assert cert_refused(STRANGER) == (
        "client certificate matches no principal"
        " (uri spiffe://corp/stranger, dns stranger.internal)"
    )


def test_a_certificate_naming_two_principals_is_401_not_a_pick() -> None:
    both = PeerCert(uris=("spiffe://corp/billing",), cns=("ops-svc",))
    assert (
        cert_refused(both) == "client certificate matches several principals: billing-svc, ops-svc"
    )


def test_getpeercert_output_becomes_the_names_matched() -> None:
    parsed = {
        "subject": ((("organizationName", "corp"),), (("commonName", "billing"),)),
        "subjectAltName": (
            ("DNS", "billing.internal"),
            ("URI", "spiffe://corp/billing"),
            ("IP Address", "10.0.0.1"),
            ("email", "ops@corp.example"),
        ),
    }
    assert peer_cert(parsed) == PeerCert(
        uris=("spiffe://corp/billing",), dns=("billing.internal",), cns=("billing",)
    )
    # Without a verified certificate getpeercert() is empty (or there is no TLS at all).
    assert peer_cert({}) is None
    assert peer_cert(None) is None
