"""The ``solapi-gateway`` command as a user runs it: a real process, its exit code and output."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multidict import CIMultiDict

from gateway.config import load
from gateway.identity import identify, verifier_for
from gateway.signing import parse

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = "config/demo/gateway.yaml"
DEMO_SECRET = (REPO / "config/demo/api_secret").read_text().strip()
DEMO_KEY = "NCSDEMOKEY000001"
SCRIPT = Path(sys.executable).parent / "solapi-gateway"
DATE = "2026-11-28T09:15:02Z"
SALT = "0123456789abcdef0123456789abcdef"
PROBLEM_LINE = re.compile(r"[^:\n]+:\d+: \S+: .+")

BROKEN_CONFIG = """\
listen: "0.0.0.0:8080"
admin_listen: "0.0.0.0:8080"
upstream:
  url: "ftp://api.solapi.com"
credentials:
  api_key: "NCSTESTKEY000001"
  api_secret_file: "api_secret"
max_body_bytes: "big"
"""
BROKEN_POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
routes:
  - name: restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: SUPERUSER
"""
BROKEN_SECRET = "broken-config-secret-71c2"


def run(
    *args: str, cwd: Path | str = REPO, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "gateway"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SOLAPI_")}
    full_env.update(env or {})
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A config folder whose config and policy hold five problems between them."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "gateway.yaml").write_text(BROKEN_CONFIG)
    (folder / "policy.yaml").write_text(BROKEN_POLICY)
    (folder / "api_secret").write_text(BROKEN_SECRET + "\n")
    return tmp_path


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A folder laid out like a deployment: ``config/gateway.yaml`` holding the demo config."""
    shutil.copytree(REPO / "config" / "demo", tmp_path / "config")
    return tmp_path


def broken_problems(prefix: str) -> list[str]:
    config, policy = f"{prefix}gateway.yaml", f"{prefix}policy.yaml"
    return [
        f"{config}:2: admin_listen: must not share the proxy port",
        f"{config}:4: upstream.url: must be http(s)://HOST[:PORT] only: the scheme is 'ftp'",
        f"{config}:8: max_body_bytes: must be an integer",
        f"{policy}:6: routes[0].min_role: unknown role 'SUPERUSER' (roles: VIEWER, MEMBER, OWNER)",
    ]


# --- check-config ------------------------------------------------------------------


def test_check_config_on_the_demo_prints_a_summary() -> None:
    result = run("check-config", "--config", DEMO_CONFIG)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{DEMO_CONFIG}: OK"
    # every key of gateway.yaml, with its value (defaults marked), then the policy
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.startswith("  ")}
    assert rows["listen"] == ["127.0.0.1:8080"]
    assert rows["admin_listen"] == ["127.0.0.1:9090"]
    assert rows["upstream.url"] == ["http://127.0.0.1:8089"]
    assert rows["upstream.max_concurrent"] == ["512", "(default)"]
    assert rows["credentials.api_key"] == ["NCSD…"]
    assert rows["credentials.api_secret_file"] == ["from", "file", "config/demo/api_secret"]
    assert rows["policy"] == ["config/demo/policy.yaml"]
    assert "policy config/demo/policy.yaml: roles VIEWER < MEMBER < OWNER" in lines
    assert any(
        "records-bulk-restore: POST /crm-core/v1/records/bulk/restore" in line and "MEMBER+" in line
        for line in lines
    )
    assert DEMO_SECRET not in result.stdout + result.stderr
    assert_no_traceback(result)


def test_check_config_uses_config_gateway_yaml_by_default(demo_copy: Path) -> None:
    result = run("check-config", cwd=demo_copy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "config/gateway.yaml: OK"
    assert DEMO_SECRET not in result.stdout + result.stderr


def test_check_config_lists_every_problem_and_exits_2(broken: Path) -> None:
    result = run("check-config", "--config", "conf/gateway.yaml", cwd=broken)
    assert result.returncode == 2
    assert result.stdout == ""
    # Files are named as given: relative to where the user ran the command.
    assert result.stderr.splitlines() == broken_problems("conf/")
    assert BROKEN_SECRET not in result.stderr
    assert_no_traceback(result)


def test_check_config_names_files_as_given_when_absolute(broken: Path) -> None:
    result = run("check-config", "--config", str(broken / "conf" / "gateway.yaml"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == broken_problems(f"{broken / 'conf'}{os.sep}")


def test_check_config_through_the_console_script(broken: Path) -> None:
    ok = run("check-config", "--config", DEMO_CONFIG, script=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{DEMO_CONFIG}: OK\n")
    bad = run("check-config", "--config", "conf/gateway.yaml", cwd=broken, script=True)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == broken_problems("conf/")


def test_check_config_on_unparseable_yaml_is_a_problem_line(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("listen: [\n")
    result = run("check-config", "--config", "gateway.yaml", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("gateway.yaml:")
    assert ": (top): not valid YAML: " in line
    assert_no_traceback(result)


def test_check_config_without_a_config_file_says_so(tmp_path: Path) -> None:
    result = run("check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "config/gateway.yaml:1: (file): cannot read config/gateway.yaml: No such file or directory"
    ]


def test_check_config_on_the_production_config_names_the_missing_environment() -> None:
    result = run("check-config")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    config_lines = (REPO / "config/gateway.yaml").read_text().splitlines()
    [line] = [i for i, text in enumerate(config_lines, 1) if "api_key:" in text]
    assert (
        f"config/gateway.yaml:{line}: credentials.api_key: "
        "environment variable SOLAPI_API_KEY is not set"
    ) in lines
    assert all(PROBLEM_LINE.fullmatch(line) for line in lines), lines


def test_check_config_never_prints_an_environment_secret(tmp_path: Path) -> None:
    secret = "env-secret-value-9e1d7c"
    text = (
        (REPO / DEMO_CONFIG)
        .read_text()
        .replace('api_secret_file: "api_secret"', 'api_secret: "${SOLAPI_API_SECRET}"')
    )
    (tmp_path / "gateway.yaml").write_text(text)
    shutil.copy(REPO / "config/demo/policy.yaml", tmp_path / "policy.yaml")
    env = {"SOLAPI_API_SECRET": secret}
    ok = run("check-config", "--config", "gateway.yaml", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"^  credentials\.api_secret +from environment$", ok.stdout, re.M)
    (tmp_path / "policy.yaml").write_text("roles: []\nroutes: []\n")
    bad = run("check-config", "--config", "gateway.yaml", cwd=tmp_path, env=env)
    assert bad.returncode == 2
    for result in (ok, bad):
        assert secret not in result.stdout + result.stderr


# --- serve -------------------------------------------------------------------------


def test_serve_with_a_broken_config_exits_2_with_a_json_line(broken: Path) -> None:
    result = run("serve", "--config", "conf/gateway.yaml", cwd=broken)
    assert result.returncode == 2
    assert result.stdout == ""
    records = [json.loads(line) for line in result.stderr.splitlines()]
    [record] = [r for r in records if r.get("event") == "config_error"]
    assert record["errors"] == broken_problems("conf/")
    assert BROKEN_SECRET not in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_serve_rejects_fewer_than_one_worker(workers: str) -> None:
    # The config does not exist, so even a wrong answer cannot start a server.
    result = run("serve", "--config", "no/such/gateway.yaml", "--workers", workers)
    assert result.returncode == 2
    assert result.stderr == "--workers: must be at least 1\n"


# --- sign --------------------------------------------------------------------------


def openssl_signature(date: str, salt: str, secret: str) -> str:
    """The seed page's own shell line."""
    result = subprocess.run(
        [
            "bash",
            "-c",
            'echo -n "${DATE}${SALT}" | openssl dgst -sha256 -hmac "${API_SECRET}"'
            " | awk '{print $NF}'",
        ],
        env={**os.environ, "DATE": date, "SALT": salt, "API_SECRET": secret},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


def test_sign_prints_only_the_header_value() -> None:
    result = run("sign", "--config", DEMO_CONFIG, "--date", DATE, "--salt", SALT)
    assert result.returncode == 0, result.stderr
    expected_sig = hmac.new(DEMO_SECRET.encode(), (DATE + SALT).encode(), "sha256").hexdigest()
    assert result.stdout == (
        f"HMAC-SHA256 apiKey={DEMO_KEY}, date={DATE}, salt={SALT}, signature={expected_sig}\n"
    )
    assert DEMO_SECRET not in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_sign_agrees_with_the_seed_openssl_line() -> None:
    result = run("sign", "--config", DEMO_CONFIG, "--date", DATE, "--salt", SALT)
    assert result.returncode == 0, result.stderr
    signature = parse(result.stdout.strip()).signature
    assert signature == openssl_signature(DATE, SALT, DEMO_SECRET)


def test_sign_uses_config_gateway_yaml_by_default(demo_copy: Path) -> None:
    result = run("sign", "--date", DATE, "--salt", SALT, cwd=demo_copy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"HMAC-SHA256 apiKey={DEMO_KEY}, date={DATE}, salt={SALT}, ")


@pytest.mark.parametrize(
    "date", ["2026-11-28T18:15:02.123+09:00", "2026-11-28T09:15:02.123456Z"], ids=["kst", "micro"]
)
def test_sign_accepts_the_sdk_date_forms(date: str) -> None:
    result = run("sign", "--config", DEMO_CONFIG, "--date", date, "--salt", SALT)
    assert result.returncode == 0, result.stderr
    assert parse(result.stdout.strip()).date == date


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--salt", "short"),
        ("--salt", "0123456789abcdef0123456789abcdef!"),
        ("--date", "2026-11-28T09:15:02"),  # no zone
        ("--date", "2026-13-28T09:15:02Z"),
    ],
)
def test_sign_refuses_what_solapi_would_reject(option: str, value: str) -> None:
    args = {"--date": DATE, "--salt": SALT, option: value}
    result = run("sign", "--config", DEMO_CONFIG, *[x for kv in args.items() for x in kv])
    assert result.returncode == 2
    assert result.stdout == ""  # so $(solapi-gateway sign) never yields a half-header
    assert option in result.stderr
    assert_no_traceback(result)


def test_sign_makes_a_fresh_salt_and_the_current_date_each_time() -> None:
    before = time.time()
    first = run("sign", "--config", DEMO_CONFIG)
    second = run("sign", "--config", DEMO_CONFIG)
    after = time.time()
    headers = []
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("\n") == 1
        headers.append(parse(result.stdout.strip()))
    assert headers[0].salt != headers[1].salt
    for creds in headers:
        assert re.fullmatch(r"[0-9a-f]{32}", creds.salt)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", creds.date)
        assert int(before) - 1 <= creds.timestamp <= after + 1
        expected = hmac.new(
            DEMO_SECRET.encode(), (creds.date + creds.salt).encode(), "sha256"
        ).hexdigest()
        assert creds.signature == expected


def test_sign_with_a_broken_config_prints_nothing_on_stdout(broken: Path) -> None:
    result = run("sign", "--config", "conf/gateway.yaml", cwd=broken)
    assert result.returncode == 2
    assert result.stdout == ""
    # sign reads no policy: only the config's own problems.
    assert result.stderr.splitlines() == broken_problems("conf/")[:-1]


# --- token new ---------------------------------------------------------------------


def test_token_new_prints_the_token_once_and_an_entry_holding_its_hash(tmp_path: Path) -> None:
    result = run("token", "new", "--principal", "billing-svc", "--role", "MEMBER")
    assert result.returncode == 0, result.stderr
    token, *rest = result.stdout.splitlines()
    entry = "\n".join(rest)
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert len(token) >= 32
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)  # safe to paste into a header
    assert f'token_sha256: "{digest}"' in entry
    assert token not in entry
    assert token not in result.stderr

    # Paste the printed entry under `principals:`; the token then names that caller.
    policy_text = (
        "roles: [VIEWER, MEMBER, OWNER]\nprincipals:\n"
        + entry
        + "\nroutes:\n  - {name: r, method: POST, path: /r, min_role: MEMBER}\n"
    )
    config_text = (REPO / DEMO_CONFIG).read_text()
    (tmp_path / "gateway.yaml").write_text(config_text)
    (tmp_path / "api_secret").write_text("s")
    (tmp_path / "policy.yaml").write_text(policy_text)
    policy = load(str(tmp_path / "gateway.yaml")).policy
    headers = CIMultiDict({"Authorization": f"Bearer {token}"})
    caller = identify(headers, "203.0.113.7", policy, verifier_for(policy), time.time())
    assert (caller.principal, caller.role, caller.via) == ("billing-svc", "MEMBER", "token")
    policy.authorize(policy.match("POST", "/r"), caller.role)


def test_token_new_makes_a_new_token_every_time() -> None:
    first = run("token", "new", "--principal", "a", "--role", "VIEWER", script=True)
    second = run("token", "new", "--principal", "a", "--role", "VIEWER")
    assert first.returncode == second.returncode == 0
    assert first.stdout.splitlines()[0] != second.stdout.splitlines()[0]


@pytest.mark.parametrize(
    "args",
    [
        ["--principal", "billing-svc", "--role", "MEMBER!"],
        ["--principal", "billing-svc", "--role", "1MEMBER"],
        ["--principal", "billing svc", "--role", "MEMBER"],
        ["--principal", "billing-svc"],
    ],
    ids=["role-bang", "role-digit", "principal-space", "no-role"],
)
def test_token_new_refuses_bad_arguments_without_minting(args: list[str]) -> None:
    result = run("token", "new", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip()
    assert_no_traceback(result)


# --- help and usage ----------------------------------------------------------------


@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_help_lists_every_command(script: bool) -> None:
    result = run("--help", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: solapi-gateway")
    for command in ("serve", "demo", "sandbox", "check-config", "sign", "token"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


def test_serve_defaults_to_config_gateway_yaml() -> None:
    # (check-config and sign are run with the default above; serve would start serving.)
    result = run("serve", "--help")
    assert result.returncode == 0
    assert "--config CONFIG" in result.stdout
    assert "(default config/gateway.yaml)" in result.stdout


def test_an_unknown_command_is_a_usage_error() -> None:
    result = run("launch")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert_no_traceback(result)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"solapi-gateway \d+\.\d+\.\d+\S*\n", result.stdout)


# --- what each command needs: explain and token new sign nothing, sign reads no policy ---


def test_token_new_refuses_a_role_the_configured_policy_does_not_have() -> None:
    result = run("token", "new", "--principal", "ops", "--role", "ADMIN")  # config/gateway.yaml
    assert result.returncode == 2
    assert result.stdout == ""  # nothing minted
    assert "ADMIN is not a role of config/policy.yaml (roles: VIEWER, MEMBER, OWNER)" in (
        result.stderr
    )
    other = run("token", "new", "--principal", "ops", "--role", "MEMBER", "--config", DEMO_CONFIG)
    assert other.returncode == 0, other.stderr


def test_token_new_without_a_config_says_the_role_was_not_checked(tmp_path: Path) -> None:
    result = run("token", "new", "--principal", "ops", "--role", "ADMIN", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("sgw_")
    assert "config/gateway.yaml does not exist" in result.stderr
    assert "ADMIN was not checked" in result.stderr


def test_explain_runs_on_the_shipped_config_without_the_real_key_or_secret() -> None:
    # SOLAPI_API_KEY is unset (run() drops it) and /run/secrets/... does not exist here.
    result = run("explain", "--token", "x", "GET", "/crm-core/v1/records/trash")
    assert result.returncode == 1, result.stderr
    assert "identity  REFUSED  401 Unauthorized: unknown bearer token" in result.stdout
    allowed = run(
        "explain", "--principal", "ops", "--role", "VIEWER", "GET", "/crm-core/v1/records/trash"
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "would forward: GET https://api.solapi.com/crm-core/v1/records/trash" in allowed.stdout


def test_explain_stands_in_for_an_internal_key_secret_that_is_not_set(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text((REPO / "config/gateway.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(
        "roles: [VIEWER, MEMBER]\nprincipals:\n"
        "  - {name: sdk, role: MEMBER, hmac_key: NCSINT0000000001,"
        ' hmac_secret: "${UNSET_SECRET}"}\n'
        "routes:\n  - {name: r, method: GET, path: /r, min_role: VIEWER}\n"
    )
    config = str(tmp_path / "gateway.yaml")
    result = run(
        "explain", "--config", config, "--principal", "ops", "--role", "VIEWER", "GET", "/r"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checked = run("check-config", "--config", config)
    assert checked.returncode == 2  # a command that verifies or signs still needs it
    assert "principals[0].hmac_secret: environment variable UNSET_SECRET is not set" in (
        checked.stderr
    )


def test_sign_needs_no_policy_file(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text((REPO / DEMO_CONFIG).read_text())
    (tmp_path / "api_secret").write_text(DEMO_SECRET)
    result = run("sign", "--config", str(tmp_path / "gateway.yaml"), "--date", DATE, "--salt", SALT)
    assert result.returncode == 0, result.stderr
    expected = hmac.new(DEMO_SECRET.encode(), (DATE + SALT).encode(), "sha256").hexdigest()
    assert result.stdout.strip().endswith(f"signature={expected}")


def test_check_config_warns_of_an_empty_principals_list_and_a_placeholder_hash(
    tmp_path: Path,
) -> None:
    (tmp_path / "gateway.yaml").write_text((REPO / DEMO_CONFIG).read_text())
    (tmp_path / "api_secret").write_text(DEMO_SECRET)
    route = "routes:\n  - {name: r, method: GET, path: /r, min_role: VIEWER}\n"
    (tmp_path / "policy.yaml").write_text("roles: [VIEWER]\nprincipals: []\n" + route)
    config = str(tmp_path / "gateway.yaml")
    empty = run("check-config", "--config", config)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.splitlines()[0].endswith(": OK")
    (warning,) = [line for line in empty.stdout.splitlines() if line.startswith("warning:")]
    assert "policy.yaml:2: principals: none listed, so nobody can be identified" in warning

    zeros = "0" * 64
    (tmp_path / "policy.yaml").write_text(
        "roles: [VIEWER]\nprincipals:\n"
        f'  - {{name: billing-svc, role: VIEWER, token_sha256: "{zeros}"}}\n' + route
    )
    placeholder = run("check-config", "--config", config)
    assert placeholder.returncode == 0, placeholder.stderr
    (warning,) = [line for line in placeholder.stdout.splitlines() if line.startswith("warning:")]
    assert "principals[0].token_sha256: 00000000… is a placeholder" in warning
    assert "billing-svc cannot call" in warning
    assert placeholder.stderr == ""

    demo = run("check-config", "--config", DEMO_CONFIG)
    assert "warning:" not in demo.stdout


def test_help_shows_no_hidden_command_and_no_markup() -> None:
    outputs = [run("--help").stdout]
    outputs += [run(command, "--help").stdout for command in ("serve", "explain", "sign", "demo")]
    outputs.append(run("token", "new", "--help").stdout)
    for text in outputs:
        assert text.startswith("usage:")
        assert "SUPPRESS" not in text
        assert "_worker" not in text
        assert "``" not in text
