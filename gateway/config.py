"""``gateway.yaml``: every key declared once, and ``load`` reading it into ``Settings``.

Each key below is one field: its name, type, default, bounds and a one-line
description. Loading, defaults, unknown-key errors, the ``check-config``
summary (``gateway/report.py``) and ``docs/config.md`` all follow from it; adding
a key is adding a field.

A load reads the config, the policy it names and the secret file together and
either returns a complete ``Settings`` or raises ``ConfigError`` listing every
problem as ``FILE:LINE: key.path: message``. A reload builds a new object and
swaps one reference, so a request sees either the old set or the new one.

Two commands need less than everything, and load less (``skip``):
``explain`` and ``token new`` never sign, so they leave ``credentials`` (and an
internal key's unset ``hmac_secret``) unresolved and can run on a laptop or in
CI without the real key; ``sign`` reads no policy file.

``Settings.warnings`` lists what loads but is probably a mistake (an empty
``principals``, a placeholder token hash...): ``check-config`` prints them and
the gateway logs them, and neither refuses to run.

Paths inside the config are relative to the config file. Strings marked ``${VAR}``
below are taken from the environment; an unset one is an error.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable
from functools import cached_property
from typing import Annotated, Final

from annotated_types import Ge, Le
from pydantic import (
    AllowInfNan,
    Field,
    PlainValidator,
    PrivateAttr,
    Strict,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway import names, tls, yamlsource
from gateway.addresses import (
    Address,
    AddressField,
    StateURL,
    collector,
    origin,
    parse_address,
    state_url,
)
from gateway.headers import ALWAYS_FORWARDED, CHANGES_THE_REQUEST, NEVER_FORWARDED
from gateway.policy import Policy, read_policy
from gateway.schema import (
    MASKED,
    Bool,
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
    file_path,
    matching,
    plain,
    read_text,
    resolve,
    text,
    warn,
)
from gateway.signing import Secret, Signer
from gateway.yamlsource import ConfigError, Problem

__all__ = ["DEFAULT_CONFIG", "Address", "ConfigError", "Settings", "load", "parse_address"]

# What a load may leave out (``load(skip=...)``).
CREDENTIALS: Final = "credentials"
POLICY_FILE: Final = "policy"

DEFAULT_CONFIG: Final = "config/gateway.yaml"


class TracingSettings(Model):
    otlp_endpoint: Annotated[URL, plain(collector, env=True, keep=URL)] = Field(
        description="the OTLP/HTTP collector spans are sent to, e.g. http://collector:4318 ${VAR}"
    )
    service_name: Annotated[Str, matching(names.SERVICE_NAME, names.SERVICE_NAME_RULE)] = Field(
        "solapi-gateway", description="service.name of every span"
    )
    sample_ratio: Annotated[float, Strict(), AllowInfNan(False), Ge(0), Le(1)] = Field(
        1.0, description="share of new traces recorded (an incoming sampled flag is followed)"
    )


class UpstreamSettings(Model):
    url: Annotated[URL, plain(origin, env=True, keep=URL)] = Field(
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
    ca_file: Annotated[str, tls.ca_bundle(("upstream", "ca_file"))] | None = Field(
        None, description="CAs trusted for an https url instead of the system's (relative path)"
    )

    @field_validator("connect_timeout_s")
    @classmethod
    def _within_timeout(cls, connect: float, info: ValidationInfo) -> float:
        total = info.data.get("timeout_s")
        if total is not None and connect > total:
            raise Invalid("must not exceed timeout_s", near="timeout_s")
        return connect

    @field_validator("ca_file")
    @classmethod
    def _for_https(cls, ca_file: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("url")
        if ca_file is not None and isinstance(url, URL) and url.scheme != "https":
            warn(info, "url is not https: ca_file is not used", at=("upstream", "ca_file"))
        return ca_file

    @cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """How an https upstream is verified: None is the system's trust store."""
        return tls.upstream_context(self.ca_file) if self.ca_file is not None else None


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
    try:
        secret = read_text(path).strip()  # surrounding whitespace and the newline go
    except Invalid as exc:
        if os.path.exists(path) and not os.access(path, os.R_OK):
            # Typically a 0600 file of the host's user, mounted into the image (uid 10001).
            uid, gid = os.getuid(), os.getgid()
            raise Invalid(
                f"{exc.message}: the gateway runs as uid {uid} (gid {gid});"
                f" make the file readable by it, e.g. chgrp {gid} and chmod 0640"
            ) from None
        raise
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


def _skipped(info: ValidationInfo) -> frozenset[str]:
    skip: frozenset[str] = context(info).get("skip", frozenset())
    return skip


def _policy_file(value: object, info: ValidationInfo) -> Policy:
    if isinstance(value, Policy):
        return value
    name = text(expand_env(value))
    if not name:
        raise Invalid("is empty")
    if POLICY_FILE in _skipped(info):  # `sign`: an empty policy, never consulted
        empty = Policy.model_construct(roles=(), principals=(), trusted_headers=None, routes=())
        empty._path = resolve(info, name)
        return empty
    policy, problems = read_policy(resolve(info, name), secrets=CREDENTIALS not in _skipped(info))
    if policy is None:
        context(info).setdefault("problems", []).extend(problems)
        raise Reported()
    return policy


def _forwardable(name: str) -> str | None:
    lowered = name.lower()
    if lowered in NEVER_FORWARDED:
        return f"{name} is never forwarded upstream"
    if lowered in CHANGES_THE_REQUEST:
        return (
            f"{name} changes how upstream frames or routes the request"
            " (the gateway decides that): never forwarded upstream"
        )
    return None


HeaderName = Annotated[
    Str, matching(names.HEADER_NAME, names.HEADER_NAME_RULE), check(_forwardable)
]


def _audit_file(value: object, info: ValidationInfo) -> str:
    """The audit file's path, if the gateway will be able to append to it."""
    path = file_path(value, info, output=True)  # written, not read: no reason to reload
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


def _one_of(*words: str) -> Callable[[str], str | None]:
    return lambda value: None if value in words else f"must be {' or '.join(words)}"


class StateSettings(Model):
    """``state:``: where the replay memory and the rate-limit counters live."""

    backend: Annotated[Str, check(_one_of("memory", "redis"))] = Field(
        "memory", description="memory: this machine (workers share it); redis: every replica"
    )
    url: Annotated[StateURL, plain(state_url, env=True, keep=StateURL)] | None = Field(
        None, description="redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss:// ${VAR}"
    )
    key_prefix: Str = Field("sgw:", description="prefix of every Redis key the gateway writes")
    timeout_s: Seconds = Field(
        0.05, description="the most a request waits for the shared state, else 503"
    )
    on_error: Annotated[Str, check(_one_of("open", "closed"))] = Field(
        "open", description="rate limits when the state fails: open (allow) or closed (503)"
    )
    replay_salts: Count = Field(
        1_000_000, description="salts remembered in all, split evenly among the internal keys"
    )

    @model_validator(mode="after")
    def _url_for_redis(self) -> StateSettings:
        if self.backend == "redis" and self.url is None:
            raise Invalid("backend redis needs a url", at=("url",), near="backend")
        if self.backend != "redis" and self.url is not None:
            raise Invalid("url is only for backend redis", at=("url",))
        return self


class TlsSettings(Model):
    """HTTPS on the proxy port (gateway/tls.py); the admin port stays plain HTTP."""

    cert_file: Annotated[str, PlainValidator(tls.cert_file)] = Field(
        description="PEM certificate (chain), relative to this file; reloaded on SIGHUP"
    )
    key_file: Annotated[str, PlainValidator(tls.key_file)] = Field(
        description="its unencrypted PEM private key; reloaded on SIGHUP"
    )
    client_ca_file: Annotated[str, tls.ca_bundle(("tls", "client_ca_file"))] | None = Field(
        None, description="PEM CAs that client certificates are verified against"
    )
    require_client_cert: Bool = Field(
        False, description="refuse a handshake without a verified client certificate"
    )

    @model_validator(mode="after")
    def _verifiable(self) -> TlsSettings:
        if self.require_client_cert and self.client_ca_file is None:
            raise Invalid("needs client_ca_file to verify them with", at=("require_client_cert",))
        return self


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
    state: StateSettings = Field(
        StateSettings.model_validate({}),  # frozen: one default is safe to share
        description="replay memory and rate-limit counters: memory or redis (docs/state.md)",
    )
    tracing: TracingSettings | None = Field(
        None, description="export spans over OTLP/HTTP; absent = off (traceparent still passes)"
    )
    reload_on_change: Bool = Field(
        False, description="reload as on SIGHUP when a file the config was read from changes"
    )
    tls: TlsSettings | None = Field(
        None, description="HTTPS on the proxy port, client certificates; absent = plain HTTP"
    )
    _path: str = PrivateAttr("")
    _sha256: str = PrivateAttr("")
    _files: tuple[str, ...] = PrivateAttr(())
    _warnings: tuple[Problem, ...] = PrivateAttr(())

    @field_validator("credentials", mode="wrap")
    @classmethod
    def _unless_skipped(
        cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Credentials:
        if CREDENTIALS in _skipped(info):  # explain, token new: nothing is signed
            return Credentials.model_construct(
                api_key="(not loaded)", api_secret=None, api_secret_file=None
            )
        credentials: Credentials = handler(value)
        return credentials

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

    @model_validator(mode="after")
    def _certificates_can_arrive(self, info: ValidationInfo) -> Settings:
        named = [p.name for p in self.policy.principals if p.cert is not None]
        if named and (self.tls is None or self.tls.client_ca_file is None):
            shown = ", ".join(named[:3]) + (", …" if len(named) > 3 else "")
            why = (
                f"no tls.client_ca_file, so no client certificate is verified: {shown} cannot call"
            )
            warn(info, why, at=("tls",) if self.tls else ("policy",))
        return self

    @property
    def warnings(self) -> tuple[Problem, ...]:
        """Everything the load noted that does not stop it, config first, then policy."""
        return self._warnings + self.policy.warnings

    @property
    def config_path(self) -> str:
        """The config file as given on the command line."""
        return self._path

    @property
    def policy_path(self) -> str:
        return self.policy.path

    @property
    def config_sha256(self) -> str:
        """SHA-256 of the config file's bytes as this load read them."""
        return self._sha256

    def watched_files(self) -> tuple[str, ...]:
        """Every file this load read: the config, and each file a key of it names (the
        policy, the secret file, certificates...), as given. A change to any of them is
        a change to the running set (``reload_on_change``). Collected as the keys are
        validated (``schema.resolve``), so a new file-valued key joins by itself."""
        return (self._path, *self._files)

    @property
    def signer(self) -> Signer:
        return self.credentials.signer

    @property
    def secret_source(self) -> str:
        """Where the secret came from ("file PATH" or "environment"): never its value."""
        return self.signer.secret.source


# What a reload cannot change in a running process: listeners are bound, the
# tracer provider is made once, the state is kept where it was opened.
RESTART_KEYS = ("listen", "admin_listen", "tracing", "state", "tls")


def restart_needed_for(fresh: Settings, started: Settings) -> list[str]:
    return [
        key
        for key in RESTART_KEYS
        if _restart_key(getattr(fresh, key)) != _restart_key(getattr(started, key))
    ]


def _restart_key(value: object) -> object:
    """What of a key only a restart applies: for ``state``, where the state is kept
    (its on_error and replay_salts apply from the next request on); for ``tls``,
    whether the port speaks HTTPS at all (its certificate and key reload)."""
    if isinstance(value, StateSettings):
        return (value.backend, value.url, value.key_prefix, value.timeout_s)
    if isinstance(value, TlsSettings):
        return "https"  # the port speaks what it was bound to; its files reload
    return value


def load(config_path: str = DEFAULT_CONFIG, *, skip: frozenset[str] = frozenset()) -> Settings:
    """Read the config, its policy and its secret; ConfigError lists every problem.

    ``skip``: ``CREDENTIALS`` leaves the signing credentials (and unset internal-key
    secrets) unresolved, for commands that never sign; ``POLICY_FILE`` reads no
    policy (an empty one stands in), for ``sign``.
    """
    try:
        config_text = read_text(config_path)
    except Invalid as exc:
        raise ConfigError([Problem(config_path, 1, "(file)", exc.message)]) from None
    doc = yamlsource.read(config_path, config_text)
    others: list[Problem] = []  # the policy file's own
    base = os.path.dirname(config_path)
    files: list[str] = []
    settings = yamlsource.validate(
        Settings, doc, {"base": base, "problems": others, "skip": skip, "files": files}
    )
    problems = doc.problems + others
    if settings is None or problems:
        raise ConfigError(problems)
    settings._path = config_path
    settings._sha256 = hashlib.sha256(config_text.encode()).hexdigest()
    settings._files = tuple(dict.fromkeys(files))
    settings._warnings = tuple(doc.warnings)
    return settings
