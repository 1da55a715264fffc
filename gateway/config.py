"""``gateway.yaml`` and the files it names, read into one frozen ``Settings``.

A load reads the config, the policy and the secret file together and either
returns a complete ``Settings`` or raises ``ConfigError`` listing every
problem as ``FILE:LINE: key.path: message``. A reload builds a new object and
swaps one reference, so a request sees either the old set or the new one.

Paths inside the config are relative to the config file. Strings may hold
``${VAR}`` references, taken from the environment; an unset one is an error.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

import yaml
from yarl import URL

from gateway.policy import Policy
from gateway.policyfile import load_policy
from gateway.signing import Secret, Signer
from gateway.yamlsource import ConfigError, Problems, Source

DEFAULT_CONFIG = "config/gateway.yaml"

# Headers that must never be forwarded, whatever ``forward_headers`` lists.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization",
    }
)  # fmt: skip
NEVER_FORWARDED = HOP_BY_HOP | {"authorization", "cookie", "host", "content-length"}
ALWAYS_FORWARDED = (
    "Content-Type", "Accept", "Accept-Encoding", "Accept-Language", "User-Agent",
)  # fmt: skip

_API_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: URL
    connect_timeout_s: float
    timeout_s: float
    max_concurrent: int = 512  # exchanges in flight at once, per process
    queue_timeout_s: float = 0.1  # how long a request may wait for one of them


@dataclass(frozen=True, slots=True)
class Settings:
    config_path: str
    listen: Address
    admin_listen: Address
    upstream: UpstreamSettings
    signer: Signer
    secret_source: str  # "file <path>" or "environment": for summaries, never the value
    policy_path: str
    policy: Policy
    max_body_bytes: int
    shutdown_grace_s: float
    forward_headers: tuple[str, ...]
    workers: int = 1
    keepalive_timeout_s: float = 75.0  # idle caller connections; also bounds sending headers
    body_timeout_s: float = 15.0  # the most time a caller has to send a whole body
    audit_log: str | None = None  # the opt-in audit file, relative paths already resolved


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


def load(config_path: str = DEFAULT_CONFIG) -> Settings:
    problems = Problems()
    src = Source(config_path, problems)
    settings = _load(src, config_path)
    if problems or settings is None:
        raise ConfigError(problems.items)
    return settings


def _read(src: Source, path: str, at: yaml.Node | None, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        src.error(at, key, f"cannot read {path}: {why}")
        return None


def _load(src: Source, config_path: str) -> Settings | None:
    text = _read(src, config_path, None, "(file)")
    root = src.compose(text) if text is not None else None
    if root is None:
        if text is not None and not src.problems:
            src.error(None, "(top)", "the file is empty")
        return None
    keys = src.mapping(
        root,
        "",
        required=("upstream", "credentials"),
        optional=(
            "listen", "admin_listen", "policy", "max_body_bytes", "shutdown_grace_s",
            "forward_headers", "workers", "keepalive_timeout_s", "body_timeout_s", "audit_log",
        ),
    )  # fmt: skip
    if keys is None:
        return None
    base = os.path.dirname(config_path)

    def address(key: str, default: str) -> Address | None:
        value = src.string(keys[key], key, env=True) if key in keys else default
        if value is None:
            return None
        parsed = parse_address(value)
        if isinstance(parsed, str):
            src.error(keys.get(key), key, parsed)
            return None
        return parsed

    listen = address("listen", "0.0.0.0:8080")
    admin = address("admin_listen", "127.0.0.1:9090")
    if listen and admin and listen.port == admin.port:
        src.error(keys.get("admin_listen", root), "admin_listen", "must not share the proxy port")
    upstream = _upstream(src, keys["upstream"]) if "upstream" in keys else None
    creds = _credentials(src, keys["credentials"], base) if "credentials" in keys else None

    max_body = src.integer_at(keys, "", "max_body_bytes", 1_048_576, minimum=1)
    grace = src.number_at(keys, "", "shutdown_grace_s", 20.0, positive=False)
    workers = src.integer_at(keys, "", "workers", 1, minimum=1)
    keepalive = src.number_at(keys, "", "keepalive_timeout_s", 75.0)
    body_timeout = src.number_at(keys, "", "body_timeout_s", 15.0)

    policy_value: str | None = "policy.yaml"
    if "policy" in keys:
        policy_value = src.string(keys["policy"], "policy", env=True)
        if policy_value == "":
            src.error(keys["policy"], "policy", "is empty")
    policy_path = os.path.join(base, policy_value) if policy_value else ""
    policy = None
    if policy_path:
        policy_text = _read(src, policy_path, keys.get("policy", root), "policy")
        if policy_text is not None:
            policy_src = Source(policy_path, src.problems)
            before = len(src.problems.items)
            policy_root = policy_src.compose(policy_text)
            if policy_root is None and len(src.problems.items) == before:
                policy_src.error(None, "(top)", "the file is empty")
            elif policy_root is not None:
                policy = load_policy(policy_src, policy_root)

    forward = _forward_headers(src, keys.get("forward_headers"), policy)
    audit_log = _audit_log(src, keys["audit_log"], base) if "audit_log" in keys else None
    numbers = (max_body, grace, workers, keepalive, body_timeout)
    invalid_audit = "audit_log" in keys and audit_log is None
    if None in (listen, admin, upstream, creds, policy, forward, *numbers) or invalid_audit:
        return None
    assert listen and admin and upstream and creds and policy and forward is not None
    assert max_body and grace is not None and workers and keepalive and body_timeout
    signer, secret_source = creds
    return Settings(
        config_path=config_path,
        listen=listen,
        admin_listen=admin,
        upstream=upstream,
        signer=signer,
        secret_source=secret_source,
        policy_path=policy_path,
        policy=policy,
        max_body_bytes=max_body,
        shutdown_grace_s=grace,
        forward_headers=forward,
        workers=workers,
        keepalive_timeout_s=keepalive,
        body_timeout_s=body_timeout,
        audit_log=audit_log,
    )


def _audit_log(src: Source, node: yaml.Node, base: str) -> str | None:
    """The audit file's path, if the gateway will be able to append to it."""
    name = src.string(node, "audit_log", env=True)
    if name is None:
        return None
    if not name:
        src.error(node, "audit_log", "is empty")
        return None
    path = os.path.join(base, name)
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        problem = f"{path} is a folder, not a file"
    elif not os.path.isdir(folder):
        problem = f"the folder {folder} does not exist"
    elif os.path.exists(path):
        problem = "" if os.access(path, os.W_OK) else f"cannot append to {path}: not writable"
    else:
        writable = os.access(folder, os.W_OK | os.X_OK)
        problem = "" if writable else f"cannot create {path}: the folder is not writable"
    if problem:
        src.error(node, "audit_log", problem)
        return None
    return path


def _upstream(src: Source, node: yaml.Node) -> UpstreamSettings | None:
    keys = src.mapping(
        node,
        "upstream",
        required=("url",),
        optional=("connect_timeout_s", "timeout_s", "max_concurrent", "queue_timeout_s"),
    )
    if keys is None:
        return None
    url = None
    if "url" in keys:
        text = src.string(keys["url"], "upstream.url", env=True)
        if text is not None:
            try:
                parsed = URL(text)
            except ValueError:
                parsed = None
            if (
                parsed is None
                or parsed.scheme not in ("http", "https")
                or not parsed.host
                or parsed.path not in ("", "/")
                or parsed.query_string
                or parsed.fragment
                or parsed.user
            ):
                src.error(keys["url"], "upstream.url", "must be http(s)://HOST[:PORT] only")
            else:
                url = parsed.with_path("")
    connect = src.number_at(keys, "upstream", "connect_timeout_s", 3.0)
    total = src.number_at(keys, "upstream", "timeout_s", 30.0)
    max_concurrent = src.integer_at(keys, "upstream", "max_concurrent", 512, minimum=1)
    queue = src.number_at(keys, "upstream", "queue_timeout_s", 0.1, positive=False)
    if connect and total and connect > total:
        at = keys.get("connect_timeout_s", keys.get("timeout_s", node))
        src.error(at, "upstream.connect_timeout_s", "must not exceed timeout_s")
        return None
    if url is None or not connect or not total or not max_concurrent or queue is None:
        return None
    return UpstreamSettings(url, connect, total, max_concurrent, queue)


def _credentials(src: Source, node: yaml.Node, base: str) -> tuple[Signer, str] | None:
    keys = src.mapping(
        node, "credentials", required=("api_key",), optional=("api_secret", "api_secret_file")
    )
    if keys is None:
        return None
    api_key = None
    if "api_key" in keys:
        api_key = src.checked(
            keys["api_key"],
            "credentials.api_key",
            src.string(keys["api_key"], "credentials.api_key", env=True),
            lambda v: None if _API_KEY.fullmatch(v) else "must be letters, digits, _ or -",
        )
    if ("api_secret" in keys) == ("api_secret_file" in keys):
        src.error(node, "credentials", "give exactly one of api_secret and api_secret_file")
        return None
    secret_text: str | None
    if "api_secret" in keys:
        path, source = "credentials.api_secret", "environment"
        secret_text = src.string(keys["api_secret"], path, env=True)
    else:
        path = "credentials.api_secret_file"
        name = src.string(keys["api_secret_file"], path, env=True)
        if name == "":
            src.error(keys["api_secret_file"], path, "is empty")
        if not name:
            return None
        secret_file = os.path.join(base, name)
        source = f"file {secret_file}"
        secret_text = _read(src, secret_file, keys["api_secret_file"], path)
    if secret_text is None:
        return None
    secret_text = secret_text.strip()
    if not secret_text:
        src.error(
            keys.get("api_secret") or keys.get("api_secret_file"), path, "the secret is empty"
        )
        return None
    if api_key is None:
        return None
    return Signer(api_key, Secret(secret_text)), source


def _forward_headers(
    src: Source, node: yaml.Node | None, policy: Policy | None
) -> tuple[str, ...] | None:
    if node is None:
        return ()
    identity = set()
    if policy is not None and policy.trusted_headers is not None:
        identity = {policy.trusted_headers.principal.lower(), policy.trusted_headers.role.lower()}
    seen = {"x-request-id", *(h.lower() for h in ALWAYS_FORWARDED)}
    out: list[str] = []
    ok = isinstance(node, yaml.SequenceNode)
    for path, item, value in src.strings(node, "forward_headers"):
        lowered = value.lower()
        if not _HEADER_NAME.fullmatch(value):
            src.error(item, path, "not a valid header name")
            ok = False
        elif lowered in NEVER_FORWARDED or lowered in identity:
            src.error(item, path, f"{value} is never forwarded upstream")
            ok = False
        elif lowered not in seen:
            seen.add(lowered)
            out.append(value)
    return tuple(out) if ok else None
