"""``tls:``, ``upstream.ca_file`` and a principal's ``cert:``, as ``check-config`` reports them.

Files are checked at load: readable, the key the certificate's own, the
certificate valid now. Each problem is ``FILE:LINE: key.path: message`` and
exit 2; a certificate ending within 14 days is a warning on stdout, after the
summary, with exit 0. The warnings come from one mechanism (``schema.warn``)
that any key's validator can use; it is tested here too.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import trustme
from certs import NOW, days_ago, server_pair, short_lived_ca, write_ca
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationInfo, model_validator

from gateway import cli, yamlsource
from gateway.config import load
from gateway.schema import Model, warn

POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
principals:
  - name: billing-svc
    role: MEMBER
    cert: {uri: "spiffe://corp/billing"}
routes:
  - name: records-trash
    method: GET
    path: /crm-core/v1/records/trash
    min_role: VIEWER
"""


class Folder:
    """A config folder: gateway.yaml with ``tls:`` lines, its policy, certificates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.clients = trustme.CA()
        write_ca(self.clients, root / "clients-ca.pem")
        write_ca(self.ca, root / "ca.pem")
        server_pair(self.ca, root, "server")
        (root / "api_secret").write_text("s3cret\n")
        (root / "policy.yaml").write_text(POLICY)

    def config(self, tls: str | None, *, upstream: str = "", policy: str | None = None) -> str:
        if policy is not None:
            (self.root / "policy.yaml").write_text(policy)
        text = (
            'listen: "127.0.0.1:18443"\n'
            "upstream:\n"
            '  url: "http://127.0.0.1:18089"\n'
            f"{upstream}"
            "credentials:\n"
            '  api_key: "NCSTESTKEY000001"\n'
            '  api_secret_file: "api_secret"\n'
        )
        if tls is not None:
            text += "tls:\n" + tls
        path = self.root / "gateway.yaml"
        path.write_text(text)
        return str(path)


PAIR = '  cert_file: "server.crt"\n  key_file: "server.key"\n'
WITH_CLIENTS = PAIR + '  client_ca_file: "clients-ca.pem"\n'


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    return Folder(tmp_path)


def at(config: str, key: str) -> str:
    """``FILE:LINE: key: `` for ``key`` (e.g. ``tls.cert_file``) as written in the config."""
    lines = Path(config).read_text().splitlines()
    name = key.rpartition(".")[2]
    n = next(n for n, text in enumerate(lines, 1) if text.strip().startswith(f"{name}:"))
    return f"{config}:{n}: {key}: "


def check(config: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    """``check-config``: exit code, stdout lines, stderr lines."""
    code = cli.main(["check-config", "--config", config])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_a_valid_tls_block_is_summarised_with_no_warning(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = check(folder.config(WITH_CLIENTS), capsys)
    assert (code, err) == (0, [])
    rows = {line.split()[0]: line.split()[1] for line in out if line.startswith("  tls.")}
    assert rows == {
        "tls.cert_file": str(folder.root / "server.crt"),
        "tls.key_file": str(folder.root / "server.key"),
        "tls.client_ca_file": str(folder.root / "clients-ca.pem"),
        "tls.require_client_cert": "false",
    }
    assert "1 by client certificate" in "\n".join(out)
    assert not [line for line in out if line.startswith("warning:")]


def test_a_certificate_ending_within_14_days_is_a_warning_and_exit_0(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    server_pair(folder.ca, folder.root, "soon", days=5)
    config = folder.config(
        '  cert_file: "soon.crt"\n  key_file: "soon.key"\n  client_ca_file: "clients-ca.pem"\n'
    )
    code, out, err = check(config, capsys)
    assert (code, err) == (0, [])
    assert out[0] == f"{config}: OK"
    assert re.fullmatch(
        re.escape(f"warning: {at(config, 'tls.cert_file')}{folder.root}/soon.crt: ")
        + r"the certificate expires on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, in 4 day\(s\)",
        out[-1],
    ), out[-1]
    assert load(config).warnings[0].path == "tls.cert_file"


def problem(config: str, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = check(config, capsys)
    assert (code, out) == (2, [])
    assert len(err) == 1, err
    return err[0]


def test_an_unreadable_file_is_an_error_naming_file_line_and_key(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    config = folder.config('  cert_file: "missing.crt"\n  key_file: "server.key"\n')
    assert problem(config, capsys) == at(config, "tls.cert_file") + (
        f"cannot read {folder.root}/missing.crt: No such file or directory"
    )
    config = folder.config('  cert_file: "server.crt"\n  key_file: "gone.key"\n')
    assert problem(config, capsys) == at(config, "tls.key_file") + (
        f"cannot read {folder.root}/gone.key: No such file or directory"
    )


def test_a_key_that_is_not_the_certificates_own_is_an_error(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    server_pair(folder.ca, folder.root, "other")
    config = folder.config('  cert_file: "server.crt"\n  key_file: "other.key"\n')
    assert problem(config, capsys) == at(config, "tls.key_file") + (
        f"the key in {folder.root}/other.key does not match the certificate"
    )


def test_an_expired_or_not_yet_valid_certificate_is_an_error(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    old = folder.ca.issue_cert("localhost", not_before=days_ago(60), not_after=days_ago(1))
    old.cert_chain_pems[0].write_to_path(str(folder.root / "old.crt"))
    old.private_key_pem.write_to_path(str(folder.root / "old.key"))
    config = folder.config('  cert_file: "old.crt"\n  key_file: "old.key"\n')
    assert re.fullmatch(
        re.escape(at(config, "tls.cert_file") + f"{folder.root}/old.crt: ")
        + r"the certificate expired on \S+Z",
        problem(config, capsys),
    )
    future = folder.ca.issue_cert("localhost", not_before=NOW + dt.timedelta(days=2))
    future.cert_chain_pems[0].write_to_path(str(folder.root / "future.crt"))
    future.private_key_pem.write_to_path(str(folder.root / "future.key"))
    config = folder.config('  cert_file: "future.crt"\n  key_file: "future.key"\n')
    assert "the certificate is not valid before" in problem(config, capsys)


def test_an_encrypted_key_is_an_error_not_a_passphrase_prompt(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    key = serialization.load_pem_private_key((folder.root / "server.key").read_bytes(), None)
    (folder.root / "locked.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    config = folder.config('  cert_file: "server.crt"\n  key_file: "locked.key"\n')
    assert problem(config, capsys) == at(config, "tls.key_file") + (
        f"{folder.root}/locked.key is encrypted: give the key without a passphrase"
    )


def test_files_that_hold_no_certificate_are_errors(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder.root / "junk.pem").write_text("-----BEGIN NOTHING-----\n")
    config = folder.config(PAIR + '  client_ca_file: "junk.pem"\n')
    assert problem(config, capsys) == at(config, "tls.client_ca_file") + (
        f"{folder.root}/junk.pem holds no PEM certificate"
    )


def test_required_client_certificates_need_a_client_ca(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    config = folder.config(PAIR + "  require_client_cert: true\n")
    assert problem(config, capsys) == at(config, "tls.require_client_cert") + (
        "needs client_ca_file to verify them with"
    )


def test_a_client_ca_that_expired_is_an_error_and_one_ending_soon_a_warning(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    ending = short_lived_ca(
        folder.root / "ending.pem", not_before=days_ago(300), not_after=NOW + dt.timedelta(3)
    )
    bundle = folder.root / "bundle.pem"  # a rotation under way: the old CA beside the new
    bundle.write_bytes(ending.read_bytes() + (folder.root / "clients-ca.pem").read_bytes())
    config = folder.config(PAIR + '  client_ca_file: "bundle.pem"\n')
    code, out, _ = check(config, capsys)
    assert code == 0
    assert out[-1].startswith(
        f"warning: {at(config, 'tls.client_ca_file')}{bundle}: certificate 1 of 2:"
        " the certificate expires on "
    )
    short_lived_ca(folder.root / "expired.pem", not_before=days_ago(300), not_after=days_ago(3))
    config = folder.config(PAIR + '  client_ca_file: "expired.pem"\n')
    assert re.fullmatch(
        re.escape(at(config, "tls.client_ca_file") + f"{folder.root}/expired.pem: ")
        + r"the certificate expired on \S+Z",
        problem(config, capsys),
    )


def test_upstream_ca_file_is_checked_and_unused_with_an_http_url_is_a_warning(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    config = folder.config(None, upstream='  ca_file: "ca.pem"\n')
    code, out, _ = check(config, capsys)
    assert code == 0
    warning = f"warning: {at(config, 'upstream.ca_file')}url is not https: ca_file is not used"
    assert warning in out
    assert load(config).upstream.ca_file == str(folder.root / "ca.pem")
    config = folder.config(None, upstream='  ca_file: "nope.pem"\n')
    assert problem(config, capsys) == at(config, "upstream.ca_file") + (
        f"cannot read {folder.root}/nope.pem: No such file or directory"
    )


def test_principals_named_by_certificate_without_a_client_ca_are_a_warning(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    config = folder.config(PAIR)
    code, out, _ = check(config, capsys)
    assert code == 0
    assert out[-1] == f"warning: {at(config, 'tls')}" + (
        "no tls.client_ca_file, so no client certificate is verified: billing-svc cannot call"
    )


# --- a principal's cert: ----------------------------------------------------------------------


def policy_with(principals: str) -> str:
    return POLICY.replace(
        '  - name: billing-svc\n    role: MEMBER\n    cert: {uri: "spiffe://corp/billing"}\n',
        principals,
    )


@pytest.mark.parametrize(
    ("entry", "key", "message"),
    [
        ("    cert: {}\n", "principals[0].cert", "give exactly one of uri, dns and cn"),
        (
            '    cert: {uri: "spiffe://a", cn: "a"}\n',
            "principals[0].cert",
            "give exactly one of uri, dns and cn",
        ),
        ('    cert: {dns: ""}\n', "principals[0].cert.dns", "is empty"),
        ('    cert: {cn: "a", spiffe: "x"}\n', "principals[0].cert.spiffe", "unknown key"),
        (
            '    cert: {cn: "a"}\n    token_sha256: "' + "a" * 64 + '"\n',
            "principals[0]",
            "give one of token_sha256, hmac_key with hmac_secret, or cert",
        ),
    ],
)
def test_a_principals_cert_names_exactly_one_thing(
    folder: Folder, capsys: pytest.CaptureFixture[str], entry: str, key: str, message: str
) -> None:
    policy = policy_with("  - name: a-svc\n    role: MEMBER\n" + entry)
    error = problem(folder.config(WITH_CLIENTS, policy=policy), capsys)
    assert f": {key}: {message}" in error, error


def test_two_principals_cannot_share_a_certificate_name(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = policy_with(
        '  - name: a-svc\n    role: MEMBER\n    cert: {dns: "Svc.Internal"}\n'
        '  - name: b-svc\n    role: OWNER\n    cert: {dns: "svc.internal"}\n'
    )
    error = problem(folder.config(WITH_CLIENTS, policy=policy), capsys)
    assert (
        error
        == f"{folder.root}/policy.yaml:8: principals[1].cert.dns: certificate identity used twice"
    )


# --- the warnings mechanism -------------------------------------------------------------------


class Limits(Model):
    burst: int
    batch: int

    @model_validator(mode="after")
    def _burst_holds_a_batch(self, info: ValidationInfo) -> Limits:
        if self.burst < self.batch:
            warn(info, "smaller than a batch: such a batch never passes", at=("limits", "burst"))
        return self


class Doc(Model):
    name: str
    limits: Limits


def test_a_warning_names_file_line_and_key_and_does_not_stop_the_load() -> None:
    doc = yamlsource.read("x.yaml", "name: a\nlimits:\n  batch: 10\n  burst: 5\n")
    context: dict[str, Any] = {}
    assert yamlsource.validate(Doc, doc, context) is not None
    assert doc.problems == []
    assert [str(w) for w in doc.warnings] == [
        "x.yaml:4: limits.burst: smaller than a batch: such a batch never passes"
    ]


def test_warnings_of_a_load_that_fails_are_not_reported() -> None:
    doc = yamlsource.read("x.yaml", "name: 1\nlimits:\n  batch: 10\n  burst: 5\n")
    assert yamlsource.validate(Doc, doc, {}) is None
    assert doc.warnings == []
    assert [p.path for p in doc.problems] == ["name"]


def test_explain_cert_needs_a_client_ca_in_the_config(
    folder: Folder, capsys: pytest.CaptureFixture[str]
) -> None:
    config = folder.config(PAIR)
    cert = str(folder.root / "server.crt")
    code = cli.main(["explain", "--config", config, "--cert", cert, "GET", "/crm-core/v1/x"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("--cert: tls.client_ca_file is not set in this config")
