"""The TLS set-ups the docs promise: docs/tls.md's walkthrough, run as written, and
deploy/kubernetes/shared-tls.yaml's config, loaded from its volumes as mounted."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import trustme
import yaml
from certs import server_pair, write_ca
from support import (
    TEST_SETTINGS,
    Creds,
    GatewayProc,
    Proc,
    SandboxProc,
    answers,
    cli,
    free_ports,
    gateway_policy,
    write_gateway_config,
)

from gateway import config

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "tls.md"
MANIFEST = REPO / "deploy" / "kubernetes" / "shared-tls.yaml"


def walkthrough(step: str) -> str:
    """The code block right after ``<!-- walkthrough: STEP -->`` in docs/tls.md."""
    found = re.search(
        rf"<!-- walkthrough: {re.escape(step)} -->\n```\w+\n(.*?)```", DOC.read_text(), re.S
    )
    assert found, f"docs/tls.md has no walkthrough step {step!r}"
    return found.group(1)


def commands(block: str) -> list[str]:
    """The shell commands of a block: comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


@pytest.mark.e2e
def test_the_walkthrough_runs_as_written_and_the_gateway_takes_its_certificates(
    tmp_path: Path, creds: Creds, sandbox: SandboxProc
) -> None:
    for tool in ("openssl", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it before the tests)")
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough("certificates")],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    # Steps 4 and 5 go into the test gateway's own config and policy, paths and all.
    port, admin_port = free_ports(2)
    snippet = yaml.safe_load(walkthrough("gateway.yaml"))
    assert snippet["listen"] == "0.0.0.0:8443"
    principal = walkthrough("policy.yaml")
    path = write_gateway_config(
        tmp_path,
        port=port,
        admin_port=admin_port,
        upstream_url=sandbox.url,
        api_key=creds.api_key,
        secret_file=creds.secret_file,
        policy=gateway_policy(creds, more_principals=principal),
        settings={**TEST_SETTINGS, "tls": snippet["tls"]},
    )

    check, explain, serve, call = commands(walkthrough("call"))
    assert serve == "solapi-gateway serve --config gateway.yaml &"

    def run(command: str) -> subprocess.CompletedProcess[str]:
        argv = [cli() if a == "solapi-gateway" else a for a in shlex.split(command)]
        argv = [str(path) if a == "gateway.yaml" else a for a in argv]
        argv = [a.replace("localhost:8443", f"localhost:{port}") for a in argv]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=30)

    assert run(check).returncode == 0
    explained = run(explain)
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert "via cert" in explained.stdout and "(verified against" in explained.stdout
    proc = Proc("walkthrough gateway", [cli(), "serve", "--config", str(path)], tmp_path / "err")
    try:
        proc.wait_ready(answers(admin_port, "/readyz"))
        gateway = GatewayProc(proc, port, admin_port, path)
        called = run(call)
        assert called.returncode == 0, called.stderr
        assert '"records"' in called.stdout
        (line,) = gateway.access_lines()
        assert (line["principal"], line["role"], line["via"]) == ("billing-svc", "MEMBER", "cert")
    finally:
        proc.stop()


# --- Kubernetes: deploy/kubernetes/shared-tls.yaml ----------------------------------------------


def manifest() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def settings_text() -> str:
    text: str = manifest()["ConfigMap"]["data"]["gateway.yaml"]
    return text


def test_the_config_reads_cert_managers_secret_as_mounted_whole() -> None:
    kinds = manifest()
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (gw,) = pod["containers"]
    tls = yaml.safe_load(settings_text())["tls"]
    paths = {PurePosixPath(tls[k]) for k in ("cert_file", "key_file", "client_ca_file")}
    (folder,) = {p.parent for p in paths}
    assert {p.name for p in paths} == {"tls.crt", "tls.key", "ca.crt"}  # cert-manager's keys
    (mount,) = (m for m in gw["volumeMounts"] if m["mountPath"] == str(folder))
    assert "subPath" not in mount  # a subPath mount would never see a renewal
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == kinds["Certificate"]["spec"]["secretName"]
    assert kinds["Certificate"]["spec"]["issuerRef"]["name"] == kinds["Issuer"]["metadata"]["name"]


def test_the_service_reaches_the_https_port_and_probes_the_plain_admin_port() -> None:
    kinds = manifest()
    (gw,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    settings = yaml.safe_load(settings_text())
    assert ports["https"] == int(settings["listen"].rsplit(":", 1)[1])
    assert ports["admin"] == int(settings["admin_listen"].rsplit(":", 1)[1])
    (service_port,) = kinds["Service"]["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (443, "https")
    for probe in ("readinessProbe", "livenessProbe"):
        assert gw[probe]["httpGet"]["port"] == "admin"
        assert "scheme" not in gw[probe]["httpGet"]  # the admin port stays plain HTTP


def test_the_shared_config_passes_check_config_with_the_volumes_laid_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = manifest()
    ca = trustme.CA()
    tls_folder = tmp_path / "tls"
    tls_folder.mkdir()
    pair = server_pair(ca, tls_folder, "tls", hosts=tuple(kinds["Certificate"]["spec"]["dnsNames"]))
    assert pair.cert.name == "tls.crt"
    write_ca(ca, tls_folder / "ca.crt")
    (tmp_path / "api_secret").write_text("from-the-volume\n")
    text = settings_text()
    text = text.replace("/etc/solapi-gateway-tls/", f"{tls_folder}/")
    text = text.replace("/run/secrets/solapi/api_secret", str(tmp_path / "api_secret"))
    (tmp_path / "gateway.yaml").write_text(text)
    (tmp_path / "policy.yaml").write_text(kinds["ConfigMap"]["data"]["policy.yaml"])
    monkeypatch.setenv("SOLAPI_API_KEY", "NCSK8SEXAMPLE001")
    settings = config.load(str(tmp_path / "gateway.yaml"))
    assert settings.tls is not None and settings.tls.cert_file == str(pair.cert)
    # Only the placeholders an operator must replace with `solapi-gateway token new`.
    assert settings.warnings
    assert all("is a placeholder" in w.message for w in settings.warnings), settings.warnings
    assert {p.name for p in settings.policy.principals if p.cert is not None} == {"billing-svc"}
