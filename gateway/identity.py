"""Who is calling: the first step of every request after the target check.

Three ways in, tried in this order:

1. ``Authorization: Bearer <token>``: the token's SHA-256 is looked up in the
   policy. An unknown token is 401 even if other identity is present.
2. ``Authorization: HMAC-SHA256 ...``: an internal key pair used through an
   official SDK, verified exactly as SOLAPI (and the sandbox) verify it.
3. The trusted identity headers, only when the TCP peer address is in the
   policy's ``sources``. They are ignored whenever an Authorization is present.

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
from gateway.signing import MALFORMED, Rejected, ReplayMemory, Verifier, parse

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
    via: str  # "token", "hmac" or "trusted-headers"


def identify(
    headers: MultiMapping[str],
    peer: str | None,
    policy: Policy,
    verifier: Verifier,
    now: float,
) -> Caller:
    authorizations = headers.getall("Authorization", ())
    if len(authorizations) > 1:
        raise Unauthorized("several Authorization headers")
    if authorizations:
        return _from_authorization(authorizations[0], policy, verifier, now)
    trusted = policy.trusted_headers
    if trusted is None:
        raise Unauthorized("no credentials")
    principals = headers.getall(trusted.principal, ())
    roles = headers.getall(trusted.role, ())
    if not principals and not roles:
        raise Unauthorized("no credentials")
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
            creds = verifier.verify(value, now)
        except Rejected as exc:
            raise Unauthorized(_hmac_reason(exc, value)) from None
        principal = policy.by_hmac_key.get(creds.api_key)
        if principal is None:  # the verifier knew the key, so the policy changed under it
            raise Unauthorized("HMAC key no longer in the policy")
        return Caller(principal.name, principal.role, "hmac")
    raise Unauthorized("unsupported Authorization scheme")


def _hmac_reason(exc: Rejected, header: str) -> str:
    """The log's reason: never a part of the header the policy does not hold itself
    (a caller may send anything there, a token included)."""
    what = _HMAC_REFUSALS.get(exc.code, exc.code)
    reason = f"hmac {what} ({exc.code}): {exc.reason}"
    if exc.code not in (MALFORMED, "InvalidAPIKey"):  # one of the policy's keys: say which
        reason += f", apiKey {parse(header).api_key}"
    return reason


def verifier_for(policy: Policy, replay: ReplayMemory | None = None) -> Verifier:
    """A verifier for the policy's internal keys, remembering salts in ``replay``.

    The process chooses the memory once (gateway/state.py) and passes the same one
    to every verifier it builds, so a reload forgets no salt it has seen; without
    one, the verifier keeps its own.
    """
    secrets = {p.hmac_key: p.hmac_secret for p in policy.principals if p.hmac_key and p.hmac_secret}
    return Verifier(secrets, replay=replay)
