"""Who may call: the policy's ``roles``, ``principals`` and ``trusted_headers``.

    roles:            [VIEWER, MEMBER, OWNER]        lowest first
    principals:       - name, role, and one way in: token_sha256 (a bearer
                        token's SHA-256), hmac_key + hmac_secret (an internal key
                        pair an SDK signs with), or cert (a name in its verified
                        client certificate: uri, dns or cn)
    trusted_headers:  principal + role header names, honoured only from sources

Each key is declared once, here; ``gateway/identity.py`` uses these to decide
who a request comes from.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway import names
from gateway.headers import NOT_IDENTITY
from gateway.schema import (
    Invalid,
    Invalids,
    Model,
    Network,
    Str,
    check,
    context,
    expand_env,
    matching,
    seen,
)
from gateway.signing import Secret


def remember_roles(roles: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    """Check the list, then keep it for the role references validated after it."""
    twice = [
        Invalid(f"role {role} is listed twice", at=(i,))
        for i, role in enumerate(roles)
        if role in roles[:i]
    ]
    if twice:
        raise Invalids(twice)
    if not roles:
        raise Invalid("list at least one role, lowest first")
    context(info)["roles"] = roles
    return roles


def role_ref(role: str, info: ValidationInfo) -> str:
    roles = context(info).get("roles")
    if roles is not None and role not in roles:
        raise Invalid(f"unknown role {role!r} (roles: {', '.join(roles)})")
    return role


RoleName = Annotated[Str, matching(names.ROLE, names.ROLE_RULE)]
Roles = Annotated[tuple[RoleName, ...], AfterValidator(remember_roles)]
RoleRef = Annotated[Str, AfterValidator(role_ref)]


def once(kind: str, *, fold: bool = False) -> AfterValidator:
    """A name that must not repeat within its kind (``fold``: compared lowercased)."""

    def run(value: str, info: ValidationInfo) -> str:
        key = value.lower() if fold else value
        used = seen(info, kind)
        if key in used:
            raise Invalid(_TWICE[kind].format(value))
        used.add(key)
        return key

    return AfterValidator(run)


_TWICE = {
    "principal": "principal {} is listed twice",
    "token": "token used twice",
    "hmac_key": "key used twice",
    "cert": "certificate identity used twice",
}


def secret_value(value: object, info: ValidationInfo) -> Secret:
    """A secret given in the file, usually as ``${VAR}``; surrounding whitespace dropped.

    When the load reads no secrets (``parse_policy(secrets=False)``), an unset
    variable stands in as a random secret that no caller's signature matches."""
    if isinstance(value, Secret):
        return value
    try:
        value = expand_env(value)
    except Invalid:
        if context(info).get("secrets", True):
            raise
        return Secret(secrets.token_hex(32), "not loaded")
    if not isinstance(value, str) or not value.strip():
        raise Invalid("is empty" if isinstance(value, str) else "must be a string")
    return Secret(value.strip())


class CertMatch(Model):
    """The name in a client certificate that identifies a principal: exactly one of
    a subjectAltName URI (SPIFFE IDs), a subjectAltName DNS name, the subject's CN.
    Matched exactly (DNS names without regard to case; no wildcards)."""

    uri: Str | None = Field(None, description="a subjectAltName URI, e.g. spiffe://corp/billing")
    dns: Str | None = Field(None, description="a subjectAltName DNS name, e.g. billing.internal")
    cn: Str | None = Field(None, description="the subject's common name")

    @model_validator(mode="after")
    def _exactly_one(self, info: ValidationInfo) -> CertMatch:
        given = [(kind, value) for kind, value in self.given() if value is not None]
        if len(given) != 1:
            raise Invalid("give exactly one of uri, dns and cn")
        kind, value = given[0]
        if not value or value != value.strip():
            raise Invalid("is empty" if not value else "has surrounding spaces", at=(kind,))
        used = seen(info, "cert")
        if str(self) in used:
            raise Invalid(_TWICE["cert"], at=(kind,))
        used.add(str(self))
        return self

    def given(self) -> tuple[tuple[str, str | None], ...]:
        return (("uri", self.uri), ("dns", self.dns), ("cn", self.cn))

    @property
    def match(self) -> tuple[str, str]:
        """(kind, value) as ``identity`` looks it up: DNS names lowercased."""
        for kind, value in self.given():
            if value is not None:
                return kind, value.lower() if kind == "dns" else value
        raise AssertionError("validated to hold one")

    def __str__(self) -> str:
        kind, value = self.match
        return f"{kind} {value}"


class Principal(Model):
    """A caller the policy names, with the one way it proves who it is."""

    name: Annotated[Str, matching(names.PRINCIPAL, names.PRINCIPAL_RULE), once("principal")] = (
        Field(description="the caller's name, in logs and the principal metric")
    )
    role: RoleRef = Field(description="one of roles")
    token_sha256: (
        Annotated[Str, matching(names.SHA256_HEX, names.SHA256_HEX_RULE), once("token", fold=True)]
        | None
    ) = Field(None, description="hex SHA-256 of its bearer token (solapi-gateway token new)")
    hmac_key: (
        Annotated[Str, matching(names.API_KEY, names.API_KEY_RULE), once("hmac_key")] | None
    ) = Field(None, description="an internal SOLAPI-style API key it signs with")
    hmac_secret: Annotated[Secret, PlainValidator(secret_value)] | None = Field(
        None, description="that key's secret, e.g. ${VAR}"
    )
    cert: CertMatch | None = Field(
        None, description="or the verified client certificate naming it (see docs/tls.md)"
    )

    @model_validator(mode="after")
    def _one_way_in(self) -> Principal:
        has_token = self.token_sha256 is not None
        has_hmac = self.hmac_key is not None or self.hmac_secret is not None
        has_cert = self.cert is not None
        problems = []
        if has_token + has_hmac + has_cert != 1:
            problems.append(Invalid("give one of token_sha256, hmac_key with hmac_secret, or cert"))
        if has_hmac:
            problems += [
                Invalid("required with an internal HMAC key pair", at=(part,))
                for part in ("hmac_key", "hmac_secret")
                if getattr(self, part) is None
            ]
        if problems:
            raise Invalids(problems)
        return self


def identity_header(value: str) -> str | None:
    if value.lower() in NOT_IDENTITY:
        return f"{value} cannot carry identity"
    return None


IdentityHeader = Annotated[
    Str, matching(names.HEADER_NAME, names.HEADER_NAME_RULE), check(identity_header)
]


class TrustedHeaders(Model):
    """Identity vouched for by a trusted sender, honoured only from ``sources``."""

    principal: IdentityHeader = Field(description="header naming the principal")
    role: IdentityHeader = Field(description="header naming its role (one of roles, exactly)")
    sources: Annotated[
        tuple[Network, ...], check(lambda v: None if v else "list at least one network")
    ] = Field(description="CIDR networks whose TCP peers may send them")

    @field_validator("role")
    @classmethod
    def _differs(cls, role: str, info: ValidationInfo) -> str:
        principal = info.data.get("principal")
        if isinstance(principal, str) and principal.lower() == role.lower():
            raise Invalid("must differ from the principal header")
        return role

    def trusts(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address: Any = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        # On a dual-stack listener ("[::]:8080") IPv4 peers arrive as ::ffff:a.b.c.d.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.sources)
