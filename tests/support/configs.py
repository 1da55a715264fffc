"""What the test gateways are configured with: the run's credentials, the policies,
and the one writer of a gateway.yaml + policy.yaml folder (bench/ uses it too).

``policy_from_text`` is the one way a test turns policy text into a ``Policy``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.policy import Policy, parse_policy
from gateway.yamlsource import ConfigError

REPO = Path(__file__).resolve().parents[2]
ROLES = ("VIEWER", "MEMBER", "OWNER")
MAX_BODY_BYTES = 65536  # the test gateways' limit; 1000 IDs take about 35 kB
TRUSTED_PRINCIPAL = "X-Internal-Principal"
TRUSTED_ROLE = "X-Internal-Role"


@dataclass(frozen=True)
class Creds:
    api_key: str
    secret: str
    secret_file: Path
    tokens: dict[str, str]  # role → bearer token

    @classmethod
    def new(cls, home: Path) -> Creds:
        """A random API key and secret (written to ``home/api_secret``), a token per role."""
        secret = secrets.token_urlsafe(24)
        secret_file = home / "api_secret"
        secret_file.write_text(secret + "\n", encoding="utf-8")  # the newline is stripped
        tokens = {role: f"sgw_{role.lower()}_{secrets.token_urlsafe(24)}" for role in ROLES}
        return cls(f"NCSE2E{secrets.token_hex(5).upper()}", secret, secret_file, tokens)

    def bearer(self, role: str) -> str:
        return f"Bearer {self.tokens[role]}"


@dataclass(frozen=True)
class SdkKey:
    """An internal HMAC key pair, as an SDK service would hold it."""

    api_key: str
    secret: str
    principal: str = "sdk-svc"

    @classmethod
    def new(cls) -> SdkKey:
        return cls(f"NCSINT{secrets.token_hex(5).upper()}", secrets.token_urlsafe(24))


# --- policies -----------------------------------------------------------------------------


def principal_yaml(
    name: str,
    role: str,
    *,
    token: str | None = None,
    hmac_key: str | None = None,
    hmac_secret: str | None = None,
) -> str:
    """One entry of a policy's ``principals:`` list; a token is written as its SHA-256."""
    entry = f"  - name: {name}\n    role: {role}\n"
    if token is not None:
        entry += f'    token_sha256: "{hashlib.sha256(token.encode()).hexdigest()}"\n'
    if hmac_key is not None:
        entry += f'    hmac_key: "{hmac_key}"\n    hmac_secret: "{hmac_secret}"\n'
    return entry


def token_principals(tokens: Mapping[str, str], name: str = "test-{role}") -> str:
    """A ``principals:`` entry per role → token, named ``test-member`` and so on."""
    return "".join(
        principal_yaml(name.format(role=role.lower()), role, token=token)
        for role, token in tokens.items()
    )


ROLES_LINE = "roles: [VIEWER, MEMBER, OWNER]\n"
# The contract's bulk-restore route exactly.
RESTORE_ROUTE = """\
  - name: records-bulk-restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: MEMBER
    batch:
      field: recordIds
      max_items: 1000
      item_pattern: "^CRMRC[0-9]{16}[0-9A-Za-z]{11}$"
      unique: true
"""
# Three pass-through routes, to see the sandbox's own 400/404 answers come back.
PASS_THROUGH_ROUTES = """\
  - name: record-restore
    method: POST
    path: /crm-core/v1/records/{recordId}/restore
    min_role: MEMBER
  - name: records-trash
    method: GET
    path: /crm-core/v1/records/trash
    min_role: VIEWER
  - name: not-in-sandbox
    method: GET
    path: /crm-core/v1/not-in-sandbox
    min_role: VIEWER
"""
TRUSTED_HEADERS = f"""\
trusted_headers:
  principal: {TRUSTED_PRINCIPAL}
  role: {TRUSTED_ROLE}
  sources: ["127.0.0.1/32"]
"""
CASH_BALANCE_ROUTE = """\
  - name: cash-balance
    method: GET
    path: /cash/v1/balance
    min_role: VIEWER
    query: {}
"""


def gateway_policy(creds: Creds, more_principals: str = "") -> str:
    """The test gateways' policy.yaml: ``creds``' tokens (and ``more_principals``, YAML
    entries of the list), trusted headers from 127.0.0.1, the bulk-restore route and
    the pass-through ones."""
    return (
        ROLES_LINE
        + "principals:\n"
        + token_principals(creds.tokens)
        + more_principals
        + TRUSTED_HEADERS
        + "routes:\n"
        + RESTORE_ROUTE
        + PASS_THROUGH_ROUTES
    )


def shipped_policy(creds: Creds, sdk_key: SdkKey) -> str:
    """``config/policy.yaml`` as shipped, with the test principals (the SDK key a MEMBER),
    trusted headers from 127.0.0.1 and a ``cash-balance`` route for the SDKs' balance call."""
    text = (REPO / "config" / "policy.yaml").read_text()
    assert "\nprincipals: []\n" in text, "config/policy.yaml no longer starts with no principals"
    principals = token_principals(creds.tokens) + principal_yaml(
        sdk_key.principal, "MEMBER", hmac_key=sdk_key.api_key, hmac_secret=sdk_key.secret
    )
    text = text.replace("\nprincipals: []\n", "\nprincipals:\n" + principals, 1)
    assert text.rstrip().splitlines()[-1].startswith("    "), "routes: must come last"
    return text.rstrip() + "\n" + CASH_BALANCE_ROUTE + TRUSTED_HEADERS


def policy_from_text(text: str, name: str = "policy.yaml") -> Policy:
    """``text`` read as the gateway reads a policy file called ``name``; every problem
    found is raised at once, as one ``ConfigError``."""
    policy, problems = parse_policy(text, name)
    if policy is None:
        raise ConfigError(problems)
    return policy


# --- config folders -----------------------------------------------------------------------


def write_gateway_config(
    folder: Path,
    *,
    port: int,
    admin_port: int,
    upstream_url: str,
    api_key: str,
    secret_file: Path | str,
    policy: str,
    timeout_s: float | None = None,
    connect_timeout_s: float | None = None,
    settings: Mapping[str, Any] | None = None,
    upstream: Mapping[str, Any] | None = None,
) -> Path:
    """``gateway.yaml`` in ``folder`` and ``policy.yaml`` (holding ``policy``) beside it;
    returns the gateway.yaml path. ``settings`` are more top-level keys, each written as
    JSON, which YAML reads as it is, ``upstream`` more keys of ``upstream:``; an upstream
    timeout left None keeps its default."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(policy, encoding="utf-8")
    timeouts = {"connect_timeout_s": connect_timeout_s, "timeout_s": timeout_s}
    lines = [
        f'listen: "127.0.0.1:{port}"',
        f'admin_listen: "127.0.0.1:{admin_port}"',
        "upstream:",
        f"  url: {json.dumps(upstream_url)}",
        *(f"  {key}: {value}" for key, value in timeouts.items() if value is not None),
        *(f"  {key}: {json.dumps(value)}" for key, value in (upstream or {}).items()),
        "credentials:",
        f"  api_key: {json.dumps(api_key)}",
        f"  api_secret_file: {json.dumps(str(secret_file))}",
        'policy: "policy.yaml"',
        *(f"{key}: {json.dumps(value)}" for key, value in (settings or {}).items()),
    ]
    config = folder / "gateway.yaml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def demo_config(into: Path, listen: int, admin: int, upstream: int) -> Path:
    """A copy of config/demo whose three addresses are the given local ports."""
    source = REPO / "config" / "demo"
    for name in ("policy.yaml", "api_secret"):
        shutil.copy(source / name, into / name)
    text = (source / "gateway.yaml").read_text(encoding="utf-8")
    for old, new in (
        ('"127.0.0.1:8080"', f'"127.0.0.1:{listen}"'),
        ('"127.0.0.1:9090"', f'"127.0.0.1:{admin}"'),
        ('"http://127.0.0.1:8089"', f'"http://127.0.0.1:{upstream}"'),
    ):
        assert old in text, f"config/demo/gateway.yaml no longer holds {old}"
        text = text.replace(old, new)
    config = into / "gateway.yaml"
    config.write_text(text, encoding="utf-8")
    return config
