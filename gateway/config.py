"""``gateway.yaml``: every key declared once, and ``load`` reading it into ``Settings``.

Each key below is one field: its name, type, default, bounds and a one-line
description. Loading, defaults, unknown-key errors, the ``check-config``
summary (``gateway/report.py``) and ``docs/config.md`` all follow from it; adding
a key is adding a field.

A load reads the config, the policy it names and the secret file together and
either returns a complete ``Settings`` or raises ``ConfigError`` listing every
problem as ``FILE:LINE: key.path: message``. A reload builds a new object and
swaps one reference, so a request sees either the old set or the new one.

Paths inside the config are relative to the config file. Strings marked ``${VAR}``
below are taken from the environment; an unset one is an error.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Final

from pydantic import (
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway import names, yamlsource
from gateway.headers import ALWAYS_FORWARDED, NEVER_FORWARDED
from gateway.policy import Policy, read_policy
from gateway.schema import (
    MASKED,
    Count,
    EnvStr,
    Invalid,
    Invalids,
    Model,
    Reported,
    Seconds,
    SecondsOrZero,
    Str,
    check,
    context,
    expand_env,
    matching,
    plain,
    read_text,
    resolve,
    text,
)
from gateway.signing import Secret, Signer
from gateway.yamlsource import ConfigError, Problem

__all__ = ["DEFAULT_CONFIG", "Address", "ConfigError", "Settings", "load", "parse_address"]

DEFAULT_CONFIG: Final = "config/gateway.yaml"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address | str:
    """``HOST:PORT`` or ``[V6]:PORT`` → Address, or a problem description."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return "must be HOST:PORT with a port from 1 to 65535"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "the part in [] must be an IPv6 address"
    elif not host or ":" in host:
        return "must be HOST:PORT (write IPv6 hosts as [::1]:PORT)"
    return Address(host, int(port_text))


def _address(value: str) -> Address:
    parsed = parse_address(value)
    if isinstance(parsed, str):
        raise Invalid(parsed)
    return parsed


def _origin(value: str) -> URL:
    """``http(s)://HOST[:PORT]``, and nothing else: each request brings its own path."""
    shape = "must be http(s)://HOST[:PORT] only"
    scheme, sep, _ = value.partition("://")
    if not sep:
        raise Invalid(f"{shape}: it has no scheme (write https://{value})")
    if scheme not in ("http", "https"):
        raise Invalid(f"{shape}: the scheme is {scheme!r}")
    try:
        url = URL(value)
        port = url.port
    except ValueError:
        raise Invalid(f"{shape}: the port must be a number from 1 to 65535") from None
    if not url.host:
        raise Invalid(f"{shape}: it names no host")
    if url.user is not None or url.password is not None:
        raise Invalid(f"{shape}: it must not hold a user or password")
    if url.path not in ("", "/"):
        raise Invalid(f"{shape}: it must not hold a path (each request brings its own)")
    if url.query_string or url.fragment or "?" in value or "#" in value:
        raise Invalid(f"{shape}: it must not hold a query or fragment")
    if port is not None and not 0 < port < 65536:
        raise Invalid(f"{shape}: the port must be a number from 1 to 65535")
    return url.with_path("")


AddressField = Annotated[Address, plain(_address, env=True, keep=Address)]


class UpstreamSettings(Model):
    url: Annotated[URL, plain(_origin, env=True, keep=URL)] = Field(
        description="where SOLAPI is: http(s)://HOST[:PORT] ${VAR}"
    )
    timeout_s: Seconds = Field(30.0, description="the whole upstream exchange, retries included")
    connect_timeout_s: Seconds = Field(
        3.0, validate_default=True, description="making one connection"
    )
    max_concurrent: Count = Field(
        512, description="upstream exchanges in flight at once, per process"
    )
    queue_timeout_s: SecondsOrZero = Field(
        0.1, description="how long a request may wait for one of them before 503 Overloaded"
    )

    @field_validator("connect_timeout_s")
    @classmethod
    def _within_timeout(cls, connect: float, info: ValidationInfo) -> float:
        total = info.data.get("timeout_s")
        if total is not None and connect > total:
            raise Invalid("must not exceed timeout_s", near="timeout_s")
        return connect


def _secret_value(value: object) -> Secret:
    if isinstance(value, Secret):
        return value
    secret = text(expand_env(value)).strip()
    if not secret:
        raise Invalid("the secret is empty")
    return Secret(secret, "environment")


def _secret_file(value: object, info: ValidationInfo) -> Secret:
    if isinstance(value, Secret):
        return value
    name = text(expand_env(value))
    if not name:
        raise Invalid("is empty")
    path = resolve(info, name)
    secret = read_text(path).strip()  # surrounding whitespace and the newline go
    if not secret:
        raise Invalid("the secret is empty")
    return Secret(secret, f"file {path}")


class Credentials(Model):
    api_key: Annotated[EnvStr, matching(names.API_KEY, "must be " + names.API_KEY_RULE)] = Field(
        description="the SOLAPI API key ${VAR}", json_schema_extra=MASKED
    )
    api_secret: Annotated[Secret, PlainValidator(_secret_value)] | None = Field(
        None, description="its secret, e.g. ${SOLAPI_API_SECRET}"
    )
    api_secret_file: Annotated[Secret, PlainValidator(_secret_file)] | None = Field(
        None, description="or a file holding it, relative to this file (whitespace stripped)"
    )

    @model_validator(mode="after")
    def _one_secret(self) -> Credentials:
        if (self.api_secret is None) == (self.api_secret_file is None):
            raise Invalid("give exactly one of api_secret and api_secret_file")
        return self

    @cached_property
    def signer(self) -> Signer:
        secret = self.api_secret or self.api_secret_file
        assert secret is not None
        return Signer(self.api_key, secret)


def _policy_file(value: object, info: ValidationInfo) -> Policy:
    if isinstance(value, Policy):
        return value
    name = text(expand_env(value))
    if not name:
        raise Invalid("is empty")
    policy, problems = read_policy(resolve(info, name))
    if policy is None:
        context(info).setdefault("problems", []).extend(problems)
        raise Reported()
    return policy


def _forwardable(name: str) -> str | None:
    return f"{name} is never forwarded upstream" if name.lower() in NEVER_FORWARDED else None


HeaderName = Annotated[
    Str, matching(names.HEADER_NAME, names.HEADER_NAME_RULE), check(_forwardable)
]


def _audit_file(value: object, info: ValidationInfo) -> str:
    """The audit file's path, if the gateway will be able to append to it."""
    name = text(expand_env(value))
    if not name:
        raise Invalid("is empty")
    path = resolve(info, name)
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise Invalid(f"{path} is a folder, not a file")
    if not os.path.isdir(folder):
        raise Invalid(f"the folder {folder} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise Invalid(f"cannot append to {path}: not writable")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise Invalid(f"cannot create {path}: the folder is not writable")
    return path


class Settings(Model):
    """Everything one load read: gateway.yaml, its policy and its secret."""

    listen: AddressField = Field(
        "0.0.0.0:8080", validate_default=True, description="proxied traffic"
    )
    admin_listen: AddressField = Field(
        "127.0.0.1:9090",
        validate_default=True,
        description="/metrics /healthz /readyz: never the proxy port",
    )
    upstream: UpstreamSettings = Field(description="SOLAPI, or the sandbox")
    credentials: Credentials = Field(description="what the gateway signs with")
    policy: Annotated[Policy, PlainValidator(_policy_file)] = Field(
        "policy.yaml", validate_default=True, description="the policy file, relative to this file"
    )
    max_body_bytes: Count = Field(1_048_576, description="larger request bodies are 413")
    shutdown_grace_s: SecondsOrZero = Field(
        20.0, description="time in-flight requests get on SIGTERM"
    )
    forward_headers: tuple[HeaderName, ...] = Field(
        (), description="request headers forwarded besides the fixed allow-list"
    )
    workers: Count = Field(1, description="worker processes (serve --workers overrides it)")
    keepalive_timeout_s: Seconds = Field(
        75.0, description="idle caller connections; also bounds sending headers"
    )
    body_timeout_s: Seconds = Field(15.0, description="the most time a caller has to send a body")
    send_timeout_s: Seconds = Field(
        10.0, description="an answer the caller does not take within it ends the connection"
    )
    audit_log: Annotated[str, PlainValidator(_audit_file)] | None = Field(
        None, description="append one JSON line per batch here (relative to this file)"
    )
    _path: str = PrivateAttr("")

    @field_validator("admin_listen")
    @classmethod
    def _apart(cls, admin: Address, info: ValidationInfo) -> Address:
        listen = info.data.get("listen")
        if isinstance(listen, Address) and listen.port == admin.port:
            raise Invalid("must not share the proxy port")
        return admin

    @field_validator("forward_headers", mode="after")
    @classmethod
    def _not_identity(cls, headers: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Never the policy's identity headers; each name once, the fixed ones left out."""
        policy = info.data.get("policy")
        trusted = policy.trusted_headers if isinstance(policy, Policy) else None
        identity = {trusted.principal.lower(), trusted.role.lower()} if trusted else set()
        bad = [
            Invalid(f"{name} is never forwarded upstream", at=(i,))
            for i, name in enumerate(headers)
            if name.lower() in identity
        ]
        if bad:
            raise Invalids(bad)
        seen = {"x-request-id", *(h.lower() for h in ALWAYS_FORWARDED)}
        kept = []
        for name in headers:
            if name.lower() not in seen:
                seen.add(name.lower())
                kept.append(name)
        return tuple(kept)

    @property
    def config_path(self) -> str:
        """The config file as given on the command line."""
        return self._path

    @property
    def policy_path(self) -> str:
        return self.policy.path

    @property
    def signer(self) -> Signer:
        return self.credentials.signer

    @property
    def secret_source(self) -> str:
        """Where the secret came from ("file PATH" or "environment"): never its value."""
        return self.signer.secret.source


def load(config_path: str = DEFAULT_CONFIG) -> Settings:
    """Read the config, its policy and its secret; ConfigError lists every problem."""
    try:
        config_text = read_text(config_path)
    except Invalid as exc:
        raise ConfigError([Problem(config_path, 1, "(file)", exc.message)]) from None
    doc = yamlsource.read(config_path, config_text)
    others: list[Problem] = []  # the policy file's own
    base = os.path.dirname(config_path)
    settings = yamlsource.validate(Settings, doc, {"base": base, "problems": others})
    problems = doc.problems + others
    if settings is None or problems:
        raise ConfigError(problems)
    settings._path = config_path
    return settings
