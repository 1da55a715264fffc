"""Who is calling: the first step of every request after the target check.

Four ways in, tried in this order:

1. ``Authorization: Bearer <token>``: the token's SHA-256 is looked up in the
   policy. An unknown token is 401 even if other identity is present.
2. ``Authorization: HMAC-SHA256 ...``: an internal key pair used through an
   official SDK, verified exactly as SOLAPI (and the sandbox) verify it.
3. A client certificate that the TLS handshake verified against
   ``tls.client_ca_file``, matched against the principals' ``cert:`` (a URI or
   DNS name in its subjectAltName, or its subject's CN). It is ignored when an
   Authorization is present; one that matches no principal lets the trusted
   headers decide, and without them is 401.
4. The trusted identity headers, only when the TCP peer address is in the
   policy's ``sources``. They are ignored whenever an Authorization is present
   or the certificate named a principal.

Anything else is 401. The caller only ever learns "Unauthorized"; the reason
goes to the access log's ``reason`` (and the refusal to
``gateway_rejections_total{code="Unauthorized"}``). An internal key's refusal
reads ``hmac <what> (<SOLAPI's errorCode>): ...``, ``<what>`` one of
``malformed``, ``unknown key``, ``skewed``, ``bad signature``, ``reused``, so
a log pipeline can count them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from multidict import MultiMapping

from gateway.errors import Unauthorized
from gateway.names import PRINCIPAL
from gateway.policy import Policy
from gateway.signing import MALFORMED, HmacCredentials, Rejected, Verifier, parse

_MAX_TOKEN_CHARS: Final = 4096
_HMAC_REFUSALS: Final = {
    MALFORMED: "malformed",
    "InvalidAPIKey": "unknown key",
    "RequestTimeTooSkewed": "skewed",
    "SignatureDoesNotMatch": "bad signature",
    "DuplicatedSignature": "reused",
}


@dataclass(frozen=True, slots=True)
class Caller:
    principal: str
    role: str
    via: str  # "token", "hmac", "cert" or "trusted-headers"
    # An HMAC caller's verified signature: whether its salt is new is the replay
    # memory's to say (gateway/state.py), which this pure step cannot see.
    signed: HmacCredentials | None = None


@dataclass(frozen=True, slots=True)
class PeerCert:
    """The names of a client certificate the handshake verified (its leaf's)."""

    uris: tuple[str, ...] = ()  # subjectAltName URIs, e.g. spiffe://corp/billing
    dns: tuple[str, ...] = ()  # subjectAltName DNS names
    cns: tuple[str, ...] = ()  # the subject's commonName(s)

    def __str__(self) -> str:
        parts = [f"uri {u}" for u in self.uris] + [f"dns {d}" for d in self.dns]
        parts += [f"cn {c}" for c in self.cns]
        shown = ", ".join(parts) or "no names"
        return shown if len(shown) <= 200 else shown[:199] + "…"


def peer_cert(parsed: object) -> PeerCert | None:
    """A ``PeerCert`` from ``SSLObject.getpeercert()``, which is empty unless the
    handshake verified a certificate (None: no verified certificate)."""
    if not parsed or not isinstance(parsed, dict):
        return None
    uris, dns = [], []
    for kind, value in parsed.get("subjectAltName", ()):
        if kind == "URI":
            uris.append(value)
        elif kind == "DNS":
            dns.append(value)
    cns = [v for rdn in parsed.get("subject", ()) for k, v in rdn if k == "commonName"]
    return PeerCert(tuple(uris), tuple(dns), tuple(cns))


def identify(
    headers: MultiMapping[str],
    peer: str | None,
    policy: Policy,
    verifier: Verifier,
    now: float,
    cert: PeerCert | None = None,
) -> Caller:
    """Who sent the request; ``cert`` is the verified client certificate, if any."""
    authorizations = headers.getall("Authorization", ())
    if len(authorizations) > 1:
        raise Unauthorized("several Authorization headers")
    if authorizations:
        return _from_authorization(authorizations[0], policy, verifier, now)
    none_left = "no credentials"
    if cert is not None:
        caller = _from_certificate(cert, policy)
        if caller is not None:
            return caller
        none_left = f"client certificate matches no principal ({cert})"
    trusted = policy.trusted_headers
    if trusted is None:
        raise Unauthorized(none_left)
    principals = headers.getall(trusted.principal, ())
    roles = headers.getall(trusted.role, ())
    if not principals and not roles:
        raise Unauthorized(none_left)
    if not trusted.trusts(peer):
        raise Unauthorized("identity headers from an untrusted peer")
    if len(principals) != 1 or len(roles) != 1:
        raise Unauthorized("identity headers must each be sent exactly once")
    principal, role = principals[0], roles[0]
    if not PRINCIPAL.fullmatch(principal):
        raise Unauthorized("malformed principal header")
    if role not in policy.rank:
        raise Unauthorized("unknown role in the role header")
    return Caller(principal, role, "trusted-headers")


def _from_authorization(value: str, policy: Policy, verifier: Verifier, now: float) -> Caller:
    scheme, _, credentials = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        token = credentials.strip()
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise Unauthorized("malformed bearer token")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        principal = policy.by_token.get(digest)
        if principal is None:
            raise Unauthorized("unknown bearer token")
        return Caller(principal.name, principal.role, "token")
    if scheme == "hmac-sha256":
        try:
            creds = verifier.check(value, now)
        except Rejected as exc:
            raise Unauthorized(_hmac_reason(exc, value)) from None
        principal = policy.by_hmac_key.get(creds.api_key)
        if principal is None:  # the verifier knew the key, so the policy changed under it
            raise Unauthorized("HMAC key no longer in the policy")
        return Caller(principal.name, principal.role, "hmac", creds)
    raise Unauthorized("unsupported Authorization scheme")


def _from_certificate(cert: PeerCert, policy: Policy) -> Caller | None:
    """The one principal the certificate names; two or more is a refusal, not a pick."""
    keys = [("uri", u) for u in cert.uris] + [("dns", d.lower()) for d in cert.dns]
    keys += [("cn", c) for c in cert.cns]
    found = {p.name: p for key in keys if (p := policy.by_cert.get(key)) is not None}
    if len(found) > 1:
        raise Unauthorized(f"client certificate matches several principals: {', '.join(found)}")
    for principal in found.values():
        return Caller(principal.name, principal.role, "cert")
    return None


def _hmac_reason(exc: Rejected, header: str) -> str:
    """The log's reason: never a part of the header the policy does not hold itself
    (a caller may send anything there, a token included)."""
    what = _HMAC_REFUSALS.get(exc.code, exc.code)
    reason = f"hmac {what} ({exc.code}): {exc.reason}"
    if exc.code not in (MALFORMED, "InvalidAPIKey"):  # one of the policy's keys: say which
        reason += f", apiKey {parse(header).api_key}"
    return reason


def verifier_for(policy: Policy) -> Verifier:
    """A verifier for the policy's internal keys: ``check`` only (signature, skew).

    The salts it accepted are remembered by the process's state (gateway/state.py),
    chosen once, so a reload forgets none of them."""
    secrets = {p.hmac_key: p.hmac_secret for p in policy.principals if p.hmac_key and p.hmac_secret}
    return Verifier(secrets)
