"""gateway.yaml, the policy and the secret file read into one Settings, or every problem at once."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from gateway.config import Address, Settings, load
from gateway.signing import Secret
from gateway.yamlsource import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECRET = "tEsT-SeCrEt-9c1f2b7a44e0"  # distinctive, so a leak is easy to spot
HMAC_SECRET = "iNtErNaL-hMaC-5d3e8a01"
TOKEN_SHA256 = hashlib.sha256(b"billing-token").hexdigest()

CONFIG = """\
listen: "127.0.0.1:18080"
admin_listen: "127.0.0.1:19090"
upstream:
  url: "http://127.0.0.1:18089"
  connect_timeout_s: 2
  timeout_s: 10
credentials:
  api_key: "NCSTESTKEY000001"
  api_secret_file: "api_secret"
policy: "policy.yaml"
max_body_bytes: 4096
shutdown_grace_s: 1.5
"""

POLICY = f"""\
roles: [VIEWER, MEMBER, OWNER]
principals:
  - name: billing-svc
    role: MEMBER
    token_sha256: "{TOKEN_SHA256}"
  - name: sdk-svc
    role: OWNER
    hmac_key: "NCSINTERNAL00001"
    hmac_secret: "${{TEST_HMAC_SECRET}}"
trusted_headers:
  principal: X-Internal-Principal
  role: X-Internal-Role
  sources:
    - "127.0.0.1/32"
    - "::1/128"
routes:
  - name: records-bulk-restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: MEMBER
    batch:
      field: recordIds
      max_items: 1000
      item_pattern: "^CRMRC[0-9]{{16}}[0-9A-Za-z]{{11}}$"
      unique: true
"""

MINIMAL_POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
routes:
  - name: r
    method: POST
    path: /a
    min_role: MEMBER
"""

MARK = "# <-"  # marks the line a problem is expected on


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HMAC_SECRET", HMAC_SECRET)
    for name in ("SOLAPI_API_KEY", "SOLAPI_API_SECRET", "GW_UNSET_1", "GW_UNSET_2"):
        monkeypatch.delenv(name, raising=False)


def write(
    tmp_path: Path,
    config: str = CONFIG,
    policy: str | None = POLICY,
    secret: str | None = SECRET + "\n",
) -> str:
    """Write a config folder; return the config path as a string, as a user would give it."""
    folder = tmp_path / "conf"
    folder.mkdir(exist_ok=True)
    (folder / "gateway.yaml").write_text(config)
    if policy is not None:
        (folder / "policy.yaml").write_text(policy)
    if secret is not None:
        (folder / "api_secret").write_text(secret)
    return str(folder / "gateway.yaml")


def policy_path_of(config_path: str, value: str = "policy.yaml") -> str:
    return os.path.join(os.path.dirname(config_path), value)


def problems(config_path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(config_path)
    found = [str(p) for p in info.value.problems]
    assert found, "a ConfigError must name at least one problem"
    assert str(info.value) == "\n".join(found)
    return found


def line_of(text: str, fragment: str = MARK) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(lines) == 1, f"{fragment!r} must occur on exactly one line"
    return lines[0]


def replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def assert_one_problem(found: list[str], file: str, line: int, key: str, message: str) -> None:
    prefix = f"{file}:{line}: {key}: "
    assert len(found) == 1, found
    assert found[0].startswith(prefix), (found[0], prefix)
    assert message in found[0][len(prefix) :], (found[0], message)


# --- configs that load ---------------------------------------------------------------


def test_a_complete_config_loads_into_settings(tmp_path: Path) -> None:
    path = write(tmp_path)
    s = load(path)
    assert isinstance(s, Settings)
    assert s.config_path == path
    assert s.listen == Address("127.0.0.1", 18080)
    assert s.admin_listen == Address("127.0.0.1", 19090)
    assert str(s.upstream.url) == "http://127.0.0.1:18089"
    assert (s.upstream.connect_timeout_s, s.upstream.timeout_s) == (2.0, 10.0)
    assert s.signer.api_key == "NCSTESTKEY000001"
    assert s.signer.secret == Secret(SECRET)
    assert s.policy_path == policy_path_of(path)
    assert s.max_body_bytes == 4096
    assert s.shutdown_grace_s == 1.5
    assert s.forward_headers == ()
    assert s.policy.roles == ("VIEWER", "MEMBER", "OWNER")
    assert [p.name for p in s.policy.principals] == ["billing-svc", "sdk-svc"]
    assert s.policy.by_hmac_key["NCSINTERNAL00001"].hmac_secret == Secret(HMAC_SECRET)
    [route] = s.policy.routes
    assert (route.name, route.method, route.path, route.min_role) == (
        "records-bulk-restore",
        "POST",
        "/crm-core/v1/records/bulk/restore",
        "MEMBER",
    )
    assert route.batch is not None
    assert route.batch.field == "recordIds"
    assert route.batch.max_items == 1000
    assert route.batch.unique is True


def test_defaults_fill_in_optional_keys(tmp_path: Path) -> None:
    config = """\
upstream:
  url: "https://api.solapi.com"
credentials:
  api_key: "K1"
  api_secret_file: "api_secret"
"""
    s = load(write(tmp_path, config))
    assert s.listen == Address("0.0.0.0", 8080)
    assert s.admin_listen == Address("127.0.0.1", 9090)
    assert (s.upstream.connect_timeout_s, s.upstream.timeout_s) == (3.0, 30.0)
    assert s.max_body_bytes == 1_048_576
    assert s.shutdown_grace_s == 20.0
    assert s.policy_path.endswith(os.sep + "policy.yaml")


def test_demo_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    s = load("config/demo/gateway.yaml")
    demo_secret = (REPO / "config/demo/api_secret").read_text().strip()
    assert s.signer.secret == Secret(demo_secret)
    assert s.secret_source == "file config/demo/api_secret"
    assert s.policy_path == "config/demo/policy.yaml"
    assert str(s.upstream.url) == "http://127.0.0.1:8089"
    assert [r.name for r in s.policy.routes] == [
        "records-bulk-restore",
        "records-bulk-delete",
        "record-delete",
        "record-restore",
        "records-trash",
        "cash-balance",
    ]
    assert s.policy.trusted_headers is not None
    # The tokens named in the demo policy's comments really are the ones it lists.
    for token, name in [
        ("demo-viewer-token", "demo-viewer"),
        ("demo-member-token", "demo-member"),
        ("demo-owner-token", "demo-owner"),
    ]:
        assert s.policy.by_token[hashlib.sha256(token.encode()).hexdigest()].name == name


def test_production_config_loads_with_key_in_env_and_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "solapi_api_secret"
    secret_file.write_text(SECRET + "\n")
    text = replace(
        (REPO / "config/gateway.yaml").read_text(),
        "/run/secrets/solapi_api_secret",
        str(secret_file),
    )
    folder = tmp_path / "prod"
    folder.mkdir()
    (folder / "gateway.yaml").write_text(text)
    shutil.copy(REPO / "config/policy.yaml", folder / "policy.yaml")
    monkeypatch.setenv("SOLAPI_API_KEY", "NCSPRODKEY123456")

    s = load(str(folder / "gateway.yaml"))
    assert s.signer.api_key == "NCSPRODKEY123456"
    assert s.signer.secret == Secret(SECRET)
    assert str(s.upstream.url) == "https://api.solapi.com"
    assert s.listen == Address("0.0.0.0", 8080)
    assert s.admin_listen == Address("127.0.0.1", 9090)
    assert s.policy.principals == ()
    assert s.policy.trusted_headers is None
    assert [r.path for r in s.policy.routes] == [
        "/crm-core/v1/records/bulk/restore",
        "/crm-core/v1/records/bulk/delete",
        "/crm-core/v1/records/{recordId}",
        "/crm-core/v1/records/{recordId}/restore",
        "/crm-core/v1/records/trash",
    ]


def test_production_config_without_the_api_key_in_env_is_an_error(tmp_path: Path) -> None:
    text = (REPO / "config/gateway.yaml").read_text()
    secret_file = tmp_path / "s"
    secret_file.write_text(SECRET)
    text = replace(text, "/run/secrets/solapi_api_secret", str(secret_file))
    path = write(tmp_path, text, (REPO / "config/policy.yaml").read_text(), None)
    assert problems(path) == [
        f"{path}:{line_of(text, 'api_key:')}: credentials.api_key: "
        "environment variable SOLAPI_API_KEY is not set"
    ]


# --- ${VAR} substitution -------------------------------------------------------------


def test_env_references_are_substituted_anywhere_in_a_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_HOST", "127.0.0.2")
    monkeypatch.setenv("GW_PORT", "18181")
    monkeypatch.setenv("SOLAPI_API_KEY", "NCSFROMENV000001")
    monkeypatch.setenv("SOLAPI_API_SECRET", f"  {SECRET}\n")
    config = replace(CONFIG, '"127.0.0.1:18080"', '"${GW_HOST}:${GW_PORT}"')
    config = replace(config, '"http://127.0.0.1:18089"', '"http://${GW_HOST}:8089"')
    config = replace(config, '"NCSTESTKEY000001"', '"${SOLAPI_API_KEY}"')
    config = replace(config, 'api_secret_file: "api_secret"', 'api_secret: "${SOLAPI_API_SECRET}"')
    s = load(write(tmp_path, config, secret=None))
    assert s.listen == Address("127.0.0.2", 18181)
    assert str(s.upstream.url) == "http://127.0.0.2:8089"
    assert s.signer.api_key == "NCSFROMENV000001"
    assert s.signer.secret == Secret(SECRET)
    assert s.secret_source == "environment"


def test_every_unset_variable_is_named(tmp_path: Path) -> None:
    config = replace(CONFIG, '"127.0.0.1:18080"', '"${GW_UNSET_1}:${GW_UNSET_2}"  ' + MARK)
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config)}: listen: environment variable GW_UNSET_1, GW_UNSET_2 is not set"
    ]


def test_an_unset_secret_variable_is_an_error(tmp_path: Path) -> None:
    config = replace(
        CONFIG, 'api_secret_file: "api_secret"', 'api_secret: "${SOLAPI_API_SECRET}"  ' + MARK
    )
    path = write(tmp_path, config, secret=None)
    assert problems(path) == [
        f"{path}:{line_of(config)}: credentials.api_secret: "
        "environment variable SOLAPI_API_SECRET is not set"
    ]


def test_an_unset_variable_in_the_policy_is_reported_against_the_policy(tmp_path: Path) -> None:
    policy = replace(POLICY, "${TEST_HMAC_SECRET}", "${GW_UNSET_1}")
    path = write(tmp_path, policy=policy)
    assert problems(path) == [
        f"{policy_path_of(path)}:{line_of(policy, 'hmac_secret')}: principals[1].hmac_secret: "
        "environment variable GW_UNSET_1 is not set"
    ]


# --- the secret ----------------------------------------------------------------------


def test_secret_file_is_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "api_secret").write_text("the-wrong-secret\n")
    monkeypatch.chdir(elsewhere)
    s = load(str(tmp_path / "conf" / "gateway.yaml"))
    assert s.signer.secret == Secret(SECRET)

    # A relative config path works the same: the folder is the one the config is in.
    monkeypatch.chdir(tmp_path)
    s = load("conf/gateway.yaml")
    assert s.signer.secret == Secret(SECRET)
    assert s.secret_source == f"file {os.path.join('conf', 'api_secret')}"
    assert s.policy_path == os.path.join("conf", "policy.yaml")


def test_secret_file_may_be_absolute(tmp_path: Path) -> None:
    absolute = tmp_path / "abs_secret"
    absolute.write_text("absolute-secret-value")
    config = replace(CONFIG, '"api_secret"', f'"{absolute}"')
    s = load(write(tmp_path, config, secret=None))
    assert s.signer.secret == Secret("absolute-secret-value")


@pytest.mark.parametrize(
    "content",
    [SECRET + "\n", SECRET, SECRET + "\r\n", f"  \t{SECRET}  \n\n", f"\n{SECRET}\n"],
    ids=["newline", "bare", "crlf", "spaces-and-tabs", "leading-newline"],
)
def test_secret_file_whitespace_is_stripped(tmp_path: Path, content: str) -> None:
    s = load(write(tmp_path, secret=content))
    assert s.signer.secret == Secret(SECRET)


@pytest.mark.parametrize("content", ["", "\n", "  \n\t\n"], ids=["empty", "newline", "blank"])
def test_an_empty_secret_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, secret=content)
    assert problems(path) == [
        f"{path}:{line_of(CONFIG, 'api_secret_file')}: credentials.api_secret_file: "
        "the secret is empty"
    ]


def test_an_empty_secret_from_the_environment_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOLAPI_API_SECRET", " \n")
    config = replace(
        CONFIG, 'api_secret_file: "api_secret"', 'api_secret: "${SOLAPI_API_SECRET}"  ' + MARK
    )
    path = write(tmp_path, config, secret=None)
    assert problems(path) == [
        f"{path}:{line_of(config)}: credentials.api_secret: the secret is empty"
    ]


def test_an_empty_secret_file_name_is_an_error(tmp_path: Path) -> None:
    config = replace(CONFIG, 'api_secret_file: "api_secret"', 'api_secret_file: ""  ' + MARK)
    path = write(tmp_path, config)
    assert problems(path) == [f"{path}:{line_of(config)}: credentials.api_secret_file: is empty"]


def test_both_secret_keys_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLAPI_API_SECRET", SECRET)
    config = replace(
        CONFIG,
        'api_secret_file: "api_secret"',
        'api_secret_file: "api_secret"\n  api_secret: "${SOLAPI_API_SECRET}"',
    )
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config, 'api_key')}: credentials: "
        "give exactly one of api_secret and api_secret_file"
    ]


def test_neither_secret_key_is_an_error(tmp_path: Path) -> None:
    config = replace(CONFIG, '  api_secret_file: "api_secret"\n', "")
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config, 'api_key')}: credentials: "
        "give exactly one of api_secret and api_secret_file"
    ]


def test_a_missing_secret_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, secret=None)
    secret_path = os.path.join(os.path.dirname(path), "api_secret")
    assert problems(path) == [
        f"{path}:{line_of(CONFIG, 'api_secret_file')}: credentials.api_secret_file: "
        f"cannot read {secret_path}: No such file or directory"
    ]


def test_a_directory_as_secret_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, secret=None)
    (tmp_path / "conf" / "api_secret").mkdir()
    assert_one_problem(
        problems(path),
        path,
        line_of(CONFIG, "api_secret_file"),
        "credentials.api_secret_file",
        "cannot read",
    )


def test_a_secret_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, secret=None)
    (tmp_path / "conf" / "api_secret").write_bytes(b"\xff\xfe\x00secret")
    assert_one_problem(
        problems(path),
        path,
        line_of(CONFIG, "api_secret_file"),
        "credentials.api_secret_file",
        "not UTF-8 text",
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_secret_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path)
    (tmp_path / "conf" / "api_secret").chmod(0)
    assert_one_problem(
        problems(path),
        path,
        line_of(CONFIG, "api_secret_file"),
        "credentials.api_secret_file",
        "Permission denied",
    )
    # A 0600 file of another user, as a host's secret mounted into the image would be.
    (message,) = [str(p) for p in problems(path)]
    assert f"the gateway runs as uid {os.getuid()}" in message


# --- single problems in gateway.yaml, each on its marked line ------------------------

CONFIG_CASES: list[tuple[str, str, str, str, str]] = [
    # (id, old text, new text with MARK on the expected line, key path, message part)
    ("unknown-top", "policy:", f"listn: x  {MARK}\npolicy:", "listn", "unknown key (allowed: "),
    ("unknown-upstream", "  timeout_s: 10", f"  timeout_s: 10\n  retries: 3  {MARK}",
     "upstream.retries", "unknown key (allowed: ca_file, connect_timeout_s, max_concurrent, "),
    ("unknown-credentials", '  api_key: "NCSTESTKEY000001"',
     f'  api_key: "NCSTESTKEY000001"\n  api_secrets: x  {MARK}', "credentials.api_secrets",
     "unknown key (allowed: api_key, api_secret, api_secret_file)"),
    ("duplicate-top", "max_body_bytes: 4096", f"max_body_bytes: 4096\nmax_body_bytes: 1  {MARK}",
     "max_body_bytes", "duplicate key"),
    ("duplicate-upstream", "  timeout_s: 10", f"  timeout_s: 10\n  timeout_s: 20  {MARK}",
     "upstream.timeout_s", "duplicate key"),
    ("int-as-string", "max_body_bytes: 4096", f'max_body_bytes: "4096"  {MARK}',
     "max_body_bytes", "must be an integer"),
    ("int-as-float", "max_body_bytes: 4096", f"max_body_bytes: 1.5  {MARK}",
     "max_body_bytes", "must be an integer"),
    ("int-zero", "max_body_bytes: 4096", f"max_body_bytes: 0  {MARK}",
     "max_body_bytes", "must be at least 1"),
    ("number-as-string", "  timeout_s: 10", f'  timeout_s: "10"  {MARK}',
     "upstream.timeout_s", "must be a number"),
    ("number-as-bool", "  timeout_s: 10", f"  timeout_s: true  {MARK}",
     "upstream.timeout_s", "must be a number"),
    ("number-infinite", "  timeout_s: 10", f"  timeout_s: .inf  {MARK}",
     "upstream.timeout_s", "must be a finite number"),
    ("number-zero", "  connect_timeout_s: 2", f"  connect_timeout_s: 0  {MARK}",
     "upstream.connect_timeout_s", "must be greater than 0"),
    ("grace-negative", "shutdown_grace_s: 1.5", f"shutdown_grace_s: -1  {MARK}",
     "shutdown_grace_s", "must be 0 or more"),
    ("string-as-int", 'listen: "127.0.0.1:18080"', f"listen: 18080  {MARK}",
     "listen", "must be a string"),
    ("mapping-as-string", 'upstream:\n  url: "http://127.0.0.1:18089"\n'
     "  connect_timeout_s: 2\n  timeout_s: 10", f'upstream: "http://x"  {MARK}',
     "upstream", "must be a mapping"),
    ("list-as-string", "policy:", f"forward_headers: X-Tenant  {MARK}\npolicy:",
     "forward_headers", "must be a list"),
    ("api-key-chars", '"NCSTESTKEY000001"', f'"NCS TEST/KEY"  {MARK}',
     "credentials.api_key", "must be letters, digits, _ and - only"),
    ("connect-over-total", "  connect_timeout_s: 2", f"  connect_timeout_s: 11  {MARK}",
     "upstream.connect_timeout_s", "must not exceed timeout_s"),
    ("admin-same-port", '"127.0.0.1:19090"', f'"0.0.0.0:18080"  {MARK}',
     "admin_listen", "must not share the proxy port"),
]  # fmt: skip

BAD_ADDRESSES = [
    ("127.0.0.1", "must be HOST:PORT with a port from 1 to 65535"),
    ("127.0.0.1:", "must be HOST:PORT with a port from 1 to 65535"),
    ("127.0.0.1:0", "must be HOST:PORT with a port from 1 to 65535"),
    ("127.0.0.1:65536", "must be HOST:PORT with a port from 1 to 65535"),
    ("127.0.0.1:http", "must be HOST:PORT with a port from 1 to 65535"),
    ("", "must be HOST:PORT with a port from 1 to 65535"),
    (":8080", "must be HOST:PORT (write IPv6 hosts as [::1]:PORT)"),
    ("::1:8080", "must be HOST:PORT (write IPv6 hosts as [::1]:PORT)"),
    ("[not-v6]:8080", "the part in [] must be an IPv6 address"),
]

BAD_UPSTREAM_URLS = [
    # each mistake is named, after the shape every upstream URL must have
    ("http://api.example.com/v1", "it must not hold a path (each request brings its own)"),
    ("http://api.example.com/?x=1", "it must not hold a query or fragment"),
    ("http://api.example.com#top", "it must not hold a query or fragment"),
    ("ftp://api.example.com", "the scheme is 'ftp'"),
    ("htps://api.example.com", "the scheme is 'htps'"),
    ("file:///etc/passwd", "the scheme is 'file'"),
    ("api.example.com:443", "it has no scheme (write https://api.example.com:443)"),
    ("https://user:pw@api.example.com", "it must not hold a user or password"),
    ("http://", "it names no host"),
    ("https://api.example.com:99999", "the port must be a number from 1 to 65535"),
]


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [case[1:] for case in CONFIG_CASES],
    ids=[case[0] for case in CONFIG_CASES],
)
def test_a_config_problem_names_file_line_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    config = replace(CONFIG, old, new)
    path = write(tmp_path, config)
    assert_one_problem(problems(path), path, line_of(config), key, message)


@pytest.mark.parametrize("key", ["listen", "admin_listen"])
@pytest.mark.parametrize(("address", "message"), BAD_ADDRESSES)
def test_a_bad_listen_address_is_an_error(
    tmp_path: Path, key: str, address: str, message: str
) -> None:
    config = re.sub(rf"(?m)^{key}: .*$", f'{key}: "{address}"  {MARK}', CONFIG)
    path = write(tmp_path, config)
    assert problems(path) == [f"{path}:{line_of(config)}: {key}: {message}"]


def test_ipv6_listen_addresses_are_written_in_brackets(tmp_path: Path) -> None:
    config = replace(CONFIG, '"127.0.0.1:18080"', '"[::]:18080"')
    config = replace(config, '"127.0.0.1:19090"', '"[::1]:19090"')
    s = load(write(tmp_path, config))
    assert s.listen == Address("::", 18080)
    assert str(s.admin_listen) == "[::1]:19090"


def test_admin_port_clashes_with_a_listen_port_taken_from_the_default(tmp_path: Path) -> None:
    config = replace(CONFIG, 'admin_listen: "127.0.0.1:19090"\n', "")
    config = replace(config, '"127.0.0.1:18080"', '"0.0.0.0:9090"')
    path = write(tmp_path, config)
    [problem] = problems(path)
    assert ": admin_listen: must not share the proxy port" in problem


@pytest.mark.parametrize(("url", "why"), BAD_UPSTREAM_URLS)
def test_a_bad_upstream_url_is_an_error_that_says_what_is_wrong(
    tmp_path: Path, url: str, why: str
) -> None:
    config = replace(CONFIG, '"http://127.0.0.1:18089"', f'"{url}"  {MARK}')
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config)}: upstream.url: must be http(s)://HOST[:PORT] only: {why}"
    ]
    assert "pw" not in problems(path)[0]  # a password in the URL is never echoed


@pytest.mark.parametrize(
    ("url", "loaded"),
    [
        ("https://api.solapi.com", "https://api.solapi.com"),
        ("https://api.solapi.com/", "https://api.solapi.com"),
        ("http://[::1]:8089", "http://[::1]:8089"),
    ],
)
def test_good_upstream_urls_keep_only_scheme_host_and_port(
    tmp_path: Path, url: str, loaded: str
) -> None:
    config = replace(CONFIG, '"http://127.0.0.1:18089"', f'"{url}"')
    assert str(load(write(tmp_path, config)).upstream.url) == loaded


def test_a_short_timeout_below_the_default_connect_timeout_is_an_error(tmp_path: Path) -> None:
    config = replace(CONFIG, "  connect_timeout_s: 2\n", "")
    config = replace(config, "  timeout_s: 10", f"  timeout_s: 2  {MARK}")
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config)}: upstream.connect_timeout_s: must not exceed timeout_s"
    ]


# --- forward_headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Authorization",
        "authorization",
        "Cookie",
        "Proxy-Authorization",
        "Host",
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "TE",
        "Trailer",
        "Upgrade",
        "Content-Length",
        "X-Internal-Principal",
        "x-internal-role",
    ],
)
def test_forward_headers_refuse_headers_that_are_never_forwarded(
    tmp_path: Path, header: str
) -> None:
    config = CONFIG + f"forward_headers:\n  - X-Tenant\n  - {header}  {MARK}\n"
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config)}: forward_headers[1]: {header} is never forwarded upstream"
    ]


@pytest.mark.parametrize(
    "header",
    ["Content-Encoding", "content-encoding", "X-HTTP-Method-Override", "X-Method-Override",
     "X-HTTP-Method", "Expect", "X-Original-URL", "X-Rewrite-URL"],
)  # fmt: skip
def test_forward_headers_refuse_headers_that_change_the_request(
    tmp_path: Path, header: str
) -> None:
    config = CONFIG + f"forward_headers:\n  - X-Tenant\n  - {header}  {MARK}\n"
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config)}: forward_headers[1]: {header} changes how upstream frames"
        " or routes the request (the gateway decides that): never forwarded upstream"
    ]


def test_forward_headers_refuse_a_bad_header_name(tmp_path: Path) -> None:
    config = CONFIG + f'forward_headers: ["X-Ok",\n  "X Bad: 1"]  {MARK}\n'
    path = write(tmp_path, config)
    assert problems(path) == [
        f"{path}:{line_of(config)}: forward_headers[1]: not a valid header name"
    ]


def test_forward_headers_are_kept_once_and_defaults_are_not_repeated(tmp_path: Path) -> None:
    config = CONFIG + "forward_headers: [X-Tenant, x-tenant, Accept, X-Request-ID, X-Trace]\n"
    assert load(write(tmp_path, config)).forward_headers == ("X-Tenant", "X-Trace")


# --- the files themselves ------------------------------------------------------------


def test_invalid_yaml_is_an_error_with_its_line(tmp_path: Path) -> None:
    config = replace(CONFIG, "max_body_bytes: 4096", "max_body_bytes: [4096")
    path = write(tmp_path, config)
    [problem] = problems(path)
    assert problem.startswith(f"{path}:")
    assert ": (top): not valid YAML: " in problem


def test_invalid_yaml_in_the_policy_is_an_error(tmp_path: Path) -> None:
    policy = "roles: [VIEWER\nroutes: []\n"
    path = write(tmp_path, policy=policy)
    [problem] = problems(path)
    assert problem.startswith(f"{policy_path_of(path)}:")
    assert ": (top): not valid YAML: " in problem


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"], ids=["empty", "nl", "comment"])
def test_an_empty_config_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert problems(path) == [f"{path}:1: (top): the file is empty"]


def test_an_empty_policy_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, policy="# nothing yet\n")
    assert problems(path) == [f"{policy_path_of(path)}:1: (top): the file is empty"]


def test_an_empty_policy_is_reported_alongside_config_problems(tmp_path: Path) -> None:
    config = replace(CONFIG, "max_body_bytes: 4096", "max_body_bytes: 0")
    path = write(tmp_path, config, policy="")
    assert problems(path) == [
        f"{path}:{line_of(config, 'max_body_bytes')}: max_body_bytes: must be at least 1",
        f"{policy_path_of(path)}:1: (top): the file is empty",
    ]


def test_a_config_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "- listen\n- upstream\n")
    assert problems(path) == [f"{path}:1: (top): must be a mapping"]


def test_required_top_level_keys(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen: "127.0.0.1:18080"\n')
    assert problems(path) == [
        f"{path}:1: upstream: required key is missing",
        f"{path}:1: credentials: required key is missing",
    ]


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    assert problems(path) == [f"{path}:1: (file): cannot read {path}: No such file or directory"]


def test_a_missing_policy_file_names_the_config_folder_joined_with_its_value(
    tmp_path: Path,
) -> None:
    config = replace(CONFIG, 'policy: "policy.yaml"', f'policy: "policies/main.yaml"  {MARK}')
    path = write(tmp_path, config)
    policy_path = policy_path_of(path, "policies/main.yaml")
    assert problems(path) == [
        f"{path}:{line_of(config)}: policy: cannot read {policy_path}: No such file or directory"
    ]


def test_the_policy_file_is_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(CONFIG, 'policy: "policy.yaml"', 'policy: "policies/main.yaml"')
    write(tmp_path, config, policy=None)
    (tmp_path / "conf" / "policies").mkdir()
    (tmp_path / "conf" / "policies" / "main.yaml").write_text(MINIMAL_POLICY)
    monkeypatch.chdir(tmp_path)
    s = load("conf/gateway.yaml")
    assert s.policy_path == os.path.join("conf", "policies/main.yaml")
    assert [r.name for r in s.policy.routes] == ["r"]


def test_an_empty_policy_value_is_an_error(tmp_path: Path) -> None:
    config = replace(CONFIG, 'policy: "policy.yaml"', f'policy: ""  {MARK}')
    path = write(tmp_path, config)
    assert problems(path) == [f"{path}:{line_of(config)}: policy: is empty"]


# --- single problems in policy.yaml --------------------------------------------------

POLICY_CASES: list[tuple[str, str, str, str, str]] = [
    # (id, old text in POLICY, new text with MARK, key path, message part)
    ("unknown-top", "routes:\n", f"rutes: []  {MARK}\nroutes:\n", "rutes",
     "unknown key (allowed: limits, principals, roles, routes, trusted_headers)"),
    ("unknown-route-key", "    min_role: MEMBER", f"    min_role: MEMBER\n    auth: none  {MARK}",
     "routes[0].auth",
     "unknown key (allowed: batch, fields, method, min_role, name, params, path, query, retry,"
     " rules)"),
    ("unknown-batch-key", "      unique: true", f"      unique: true\n      min_items: 1  {MARK}",
     "routes[0].batch.min_items",
     "unknown key (allowed: field, item_pattern, max_items, unique)"),
    ("unknown-principal-key", "    role: MEMBER", f"    role: MEMBER\n    team: crm  {MARK}",
     "principals[0].team", "unknown key"),
    ("unknown-trusted-key", "  role: X-Internal-Role",
     f"  role: X-Internal-Role\n  forwarded_for: true  {MARK}",
     "trusted_headers.forwarded_for", "unknown key (allowed: principal, role, sources)"),
    ("duplicate-route-key", "    min_role: MEMBER",
     f"    min_role: MEMBER\n    min_role: OWNER  {MARK}",
     "routes[0].min_role", "duplicate key"),
    ("duplicate-top-key", "routes:\n", f"roles: [A]  {MARK}\nroutes:\n", "roles", "duplicate key"),
    ("max-items-string", "max_items: 1000", f'max_items: "1000"  {MARK}',
     "routes[0].batch.max_items", "must be an integer"),
    ("max-items-zero", "max_items: 1000", f"max_items: 0  {MARK}",
     "routes[0].batch.max_items", "must be at least 1"),
    ("unique-string", "unique: true", f'unique: "yes"  {MARK}',
     "routes[0].batch.unique", "must be true or false"),
    ("batch-field-empty", "field: recordIds", f'field: ""  {MARK}',
     "routes[0].batch.field", "is empty"),
    ("role-not-string", "    role: MEMBER", f"    role: 3  {MARK}",
     "principals[0].role", "must be a string"),
    ("unknown-principal-role", "    role: MEMBER", f"    role: ADMIN  {MARK}",
     "principals[0].role", "unknown role 'ADMIN' (roles: VIEWER, MEMBER, OWNER)"),
    ("unknown-min-role", "min_role: MEMBER", f"min_role: member  {MARK}",
     "routes[0].min_role", "unknown role 'member' (roles: VIEWER, MEMBER, OWNER)"),
    ("bad-regex", '"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$"', f'"^CRMRC[0-9"  {MARK}',
     "routes[0].batch.item_pattern", "bad regex: "),
    ("cidr-host-bits", '"127.0.0.1/32"', f'"10.0.0.1/8"  {MARK}',
     "trusted_headers.sources[0]", "not a CIDR network"),
    ("cidr-garbage", '"127.0.0.1/32"', f'"localhost"  {MARK}',
     "trusted_headers.sources[0]", "not a CIDR network"),
    ("cidr-v6-prefix", '"::1/128"', f'"::1/129"  {MARK}',
     "trusted_headers.sources[1]", "not a CIDR network"),
    ("no-sources", 'sources:\n    - "127.0.0.1/32"\n    - "::1/128"', f"sources: []  {MARK}",
     "trusted_headers.sources", "list at least one network"),
    ("identity-header-authorization", "principal: X-Internal-Principal",
     f"principal: Authorization  {MARK}", "trusted_headers.principal",
     "Authorization cannot carry identity"),
    ("identity-headers-equal", "role: X-Internal-Role", f"role: x-internal-principal  {MARK}",
     "trusted_headers.role", "must differ from the principal header"),
    ("method-lowercase", "method: POST", f"method: post  {MARK}", "routes[0].method",
     "one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    ("method-unknown", "method: POST", f"method: TRACE  {MARK}", "routes[0].method", "one of "),
    ("route-name-reserved", "name: records-bulk-restore", f"name: unmatched  {MARK}",
     "routes[0].name", "'unmatched' is reserved for metrics"),
    ("route-name-chars", "name: records-bulk-restore", f'name: "records bulk"  {MARK}',
     "routes[0].name", "a route name is letters, digits and ._-"),
    ("token-not-hex", f'"{TOKEN_SHA256}"', f'"{"z" * 64}"  {MARK}',
     "principals[0].token_sha256", "must be 64 hex digits (SHA-256)"),
    ("hmac-key-without-secret",
     '  - name: sdk-svc\n    role: OWNER\n    hmac_key: "NCSINTERNAL00001"\n'
     '    hmac_secret: "${TEST_HMAC_SECRET}"',
     f'  - name: sdk-svc  {MARK}\n    role: OWNER\n    hmac_key: "NCSINTERNAL00001"',
     "principals[1].hmac_secret",
     "required with an internal HMAC key pair"),
    ("hmac-secret-empty", '"${TEST_HMAC_SECRET}"', f'" "  {MARK}', "principals[1].hmac_secret",
     "is empty"),
    ("hmac-key-chars", '"NCSINTERNAL00001"', f'"NCS/INTERNAL"  {MARK}', "principals[1].hmac_key",
     "letters, digits, _ and - only"),
    ("roles-empty", "roles: [VIEWER, MEMBER, OWNER]", f"roles: []  {MARK}",
     "roles", "list at least one role, lowest first"),
    ("roles-not-list", "roles: [VIEWER, MEMBER, OWNER]", f"roles: VIEWER  {MARK}",
     "roles", "must be a list"),
    ("roles-twice", "roles: [VIEWER, MEMBER, OWNER]",
     f"roles: [VIEWER, MEMBER, OWNER, VIEWER]  {MARK}",
     "roles[3]", "role VIEWER is listed twice"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [case[1:] for case in POLICY_CASES],
    ids=[case[0] for case in POLICY_CASES],
)
def test_a_policy_problem_names_file_line_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    policy = replace(POLICY, old, new)
    path = write(tmp_path, policy=policy)
    assert_one_problem(problems(path), policy_path_of(path), line_of(policy), key, message)


def test_routes_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, policy="roles: [VIEWER]\nroutes:\n  name: r\n")
    assert problems(path) == [f"{policy_path_of(path)}:3: routes: must be a list"]


def test_a_principal_with_both_a_token_and_a_key_pair_is_an_error(tmp_path: Path) -> None:
    policy = replace(
        POLICY, "    role: MEMBER\n", '    role: MEMBER\n    hmac_key: "NCSINTERNAL00002"\n'
    )
    path = write(tmp_path, policy=policy)
    pp, line = policy_path_of(path), line_of(policy, "name: billing-svc")
    assert problems(path) == [
        f"{pp}:{line}: principals[0]: give one of token_sha256, hmac_key with hmac_secret, or cert",
        f"{pp}:{line}: principals[0].hmac_secret: required with an internal HMAC key pair",
    ]


@pytest.mark.parametrize(
    "route_path",
    [
        "crm-core/v1/records",
        "/crm-core//records",
        "/crm-core/../records",
        "/crm-core/./records",
        "/crm-core/%2E%2E/records",
        "/crm-core/{id}x",
        "/crm-core/{id}/{id}",
        "/crm-core/{}",
        "/crm-core/records list",
        "/crm-core/records?x=1",
        "/crm-core/records#top",
        "/crm-core\\\\records",
        "/crm-core/레코드",
    ],
)
def test_a_bad_route_path_is_an_error(tmp_path: Path, route_path: str) -> None:
    policy = replace(
        POLICY, "path: /crm-core/v1/records/bulk/restore", f'path: "{route_path}"  {MARK}'
    )
    path = write(tmp_path, policy=policy)
    assert_one_problem(problems(path), policy_path_of(path), line_of(policy), "routes[0].path", "")


@pytest.mark.parametrize(
    ("route_path", "message"),
    [
        ("no/slash", "must start with /"),
        ("/a//b", "must not contain //"),
        ("/a/../b", "must not contain . or .. segments"),
        ("/a/%41", "must be a plain path: no %, \\, ?, #, spaces or non-ASCII"),
        ("/a/{x}.json", "a {name} placeholder must be a whole segment"),
        ("/a/{x}/b/{x}", "placeholder names must differ"),
    ],
)
def test_route_path_messages(tmp_path: Path, route_path: str, message: str) -> None:
    policy = replace(MINIMAL_POLICY, "path: /a", f'path: "{route_path}"')
    path = write(tmp_path, policy=policy)
    assert problems(path) == [
        f"{policy_path_of(path)}:{line_of(policy, 'path:')}: routes[0].path: {message}"
    ]


@pytest.mark.parametrize(
    "route_path", ["/", "/a/", "/a/{id}", "/records/{id}/restore", "/a/b:c/~d_e.f"]
)
def test_good_route_paths_load(tmp_path: Path, route_path: str) -> None:
    policy = replace(MINIMAL_POLICY, "path: /a", f'path: "{route_path}"')
    s = load(write(tmp_path, policy=policy))
    assert s.policy.routes[0].path == route_path


ROUTE = """\
  - name: {name}
    method: {method}
    path: {path}
    min_role: VIEWER
"""


def routes_policy(*routes: tuple[str, str, str]) -> str:
    return "roles: [VIEWER, MEMBER]\nroutes:\n" + "".join(
        ROUTE.format(name=n, method=m, path=p) for n, m, p in routes
    )


def test_a_route_name_used_twice_is_an_error(tmp_path: Path) -> None:
    policy = routes_policy(("list", "GET", "/a"), ("list", "POST", "/a"))
    path = write(tmp_path, policy=policy)
    assert problems(path) == [
        f"{policy_path_of(path)}:7: routes[1].name: route name list is used twice"
    ]


def test_the_same_method_and_path_twice_is_an_error(tmp_path: Path) -> None:
    policy = routes_policy(
        ("one", "GET", "/a/b"), ("two", "POST", "/a/b"), ("three", "GET", "/a/b")
    )
    path = write(tmp_path, policy=policy)
    assert problems(path) == [
        f"{policy_path_of(path)}:11: routes[2]: another route already serves GET /a/b"
    ]


def test_templates_that_differ_only_in_placeholder_names_are_the_same_route(
    tmp_path: Path,
) -> None:
    policy = routes_policy(("one", "GET", "/r/{id}"), ("two", "GET", "/r/{record}"))
    path = write(tmp_path, policy=policy)
    assert problems(path) == [
        f"{policy_path_of(path)}:7: routes[1]: another route already serves GET /r/{{record}}"
    ]


def test_principal_listed_twice_and_token_used_twice(tmp_path: Path) -> None:
    policy = f"""\
roles: [VIEWER, MEMBER]
principals:
  - name: svc
    role: VIEWER
    token_sha256: "{TOKEN_SHA256}"
  - name: svc
    role: MEMBER
    token_sha256: "{TOKEN_SHA256.upper()}"
routes: []
"""
    path = write(tmp_path, policy=policy)
    pp = policy_path_of(path)
    assert problems(path) == [
        f"{pp}:6: principals[1].name: principal svc is listed twice",
        f"{pp}:8: principals[1].token_sha256: token used twice",
    ]


def test_a_twin_is_reported_even_when_the_first_entry_is_bad(tmp_path: Path) -> None:
    policy = f"""\
roles: [VIEWER]
principals:
  - name: svc
    role: ADMIN
    token_sha256: "{TOKEN_SHA256}"
  - name: svc
    role: VIEWER
    token_sha256: "{"1" * 64}"
routes:
  - {{name: r, method: GET, path: /a, min_role: ADMIN}}
  - {{name: r, method: GET, path: /b, min_role: VIEWER}}
"""
    path = write(tmp_path, policy=policy)
    pp = policy_path_of(path)
    assert problems(path) == [
        f"{pp}:4: principals[0].role: unknown role 'ADMIN' (roles: VIEWER)",
        f"{pp}:6: principals[1].name: principal svc is listed twice",
        f"{pp}:10: routes[0].min_role: unknown role 'ADMIN' (roles: VIEWER)",
        f"{pp}:11: routes[1].name: route name r is used twice",
    ]


def test_principal_with_neither_token_nor_hmac_key(tmp_path: Path) -> None:
    policy = "roles: [VIEWER]\nprincipals:\n  - name: svc\n    role: VIEWER\nroutes: []\n"
    path = write(tmp_path, policy=policy)
    assert problems(path) == [
        f"{policy_path_of(path)}:3: principals[0]: "
        "give one of token_sha256, hmac_key with hmac_secret, or cert"
    ]


# --- every problem at once -----------------------------------------------------------


def test_every_problem_in_both_files_is_reported_at_once(tmp_path: Path) -> None:
    config = """\
listen: "0.0.0.0:8080"
admin_listen: "127.0.0.1:8080"
upstream:
  url: "https://api.solapi.com/v1"
  timeout_s: "30"
  retries: 2
credentials:
  api_key: "${GW_UNSET_1}"
  api_secret_file: "api_secret"
policy: "policy.yaml"
max_body_bytes: 1MB
forward_headers: [Cookie]
"""
    policy = """\
roles: [VIEWER, MEMBER, OWNER]
principals:
  - name: billing-svc
    role: ADMIN
    token_sha256: "0123"
trusted_headers:
  principal: X-Internal-Principal
  role: X-Internal-Role
  sources: ["10.0.0.1/8"]
routes:
  - name: restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: SUPERUSER
    batch:
      field: recordIds
      max_items: many
      item_pattern: "(unclosed"
  - name: restore
    method: POST
    path: crm-core/{id}x
    min_role: MEMBER
    colour: red
"""
    path = write(tmp_path, config, policy)
    pp = policy_path_of(path)
    found = problems(path)
    expected_prefixes = [
        f"{path}:2: admin_listen: must not share the proxy port",
        f"{path}:4: upstream.url: must be http(s)://HOST[:PORT] only",
        f"{path}:5: upstream.timeout_s: must be a number",
        f"{path}:6: upstream.retries: unknown key",
        f"{path}:8: credentials.api_key: environment variable GW_UNSET_1 is not set",
        f"{path}:11: max_body_bytes: must be an integer",
        f"{pp}:4: principals[0].role: unknown role 'ADMIN' (roles: VIEWER, MEMBER, OWNER)",
        f"{pp}:5: principals[0].token_sha256: must be 64 hex digits (SHA-256)",
        f"{pp}:9: trusted_headers.sources[0]: not a CIDR network",
        f"{pp}:14: routes[0].min_role: unknown role 'SUPERUSER' (roles: VIEWER, MEMBER, OWNER)",
        f"{pp}:17: routes[0].batch.max_items: must be an integer",
        f"{pp}:18: routes[0].batch.item_pattern: bad regex",
        f"{pp}:23: routes[1].colour: unknown key",
        f"{pp}:19: routes[1].name: route name restore is used twice",
        f"{pp}:21: routes[1].path: must start with /",
        f"{path}:12: forward_headers[0]: Cookie is never forwarded upstream",
    ]
    assert len(found) == len(expected_prefixes), found
    for prefix in expected_prefixes:
        assert sum(p.startswith(prefix) for p in found) == 1, (prefix, "\n".join(found))
    for problem in found:
        assert re.fullmatch(r".+:\d+: \S+: .+", problem)


# --- secrets stay secret -------------------------------------------------------------


def all_text(err: ConfigError) -> str:
    return "\n".join([str(err), repr(err), *map(repr, err.problems)])


def test_no_secret_appears_in_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLAPI_API_SECRET", SECRET)
    config = replace(CONFIG, 'api_secret_file: "api_secret"', 'api_secret: "${SOLAPI_API_SECRET}"')
    config = replace(config, '"NCSTESTKEY000001"', '"bad key"')
    config = replace(config, "max_body_bytes: 4096", "max_body_bytes: -1")
    policy = replace(POLICY, "    role: MEMBER\n", "    role: NOBODY\n")
    policy = replace(policy, "min_role: MEMBER", "min_role: NOBODY")
    path = write(tmp_path, config, policy, secret=None)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert len(info.value.problems) == 4
    assert SECRET not in all_text(info.value)
    assert HMAC_SECRET not in all_text(info.value)


@pytest.mark.parametrize(
    "secret",
    [SECRET, f"{SECRET}: [", f"%{SECRET}", f"- {SECRET}\n- {SECRET}", f"{SECRET}\xff"],
    ids=["plain", "yaml-error", "bad-token", "a-list", "odd-char"],
)
def test_pointing_config_or_policy_at_the_secret_file_leaks_nothing(
    tmp_path: Path, secret: str
) -> None:
    config = replace(CONFIG, 'policy: "policy.yaml"', 'policy: "api_secret"')
    path = write(tmp_path, config, secret=secret)
    for target in (path, str(tmp_path / "conf" / "api_secret")):
        with pytest.raises(ConfigError) as info:
            load(target)
        assert SECRET not in all_text(info.value)


def test_no_secret_appears_in_the_settings_repr(tmp_path: Path) -> None:
    s = load(write(tmp_path))
    for text in (repr(s), str(s), repr(s.signer), repr(s.policy), repr(s.policy.principals)):
        assert SECRET not in text
        assert HMAC_SECRET not in text
    assert isinstance(s.signer.secret, Secret)
    assert s.signer.secret.reveal() == SECRET
