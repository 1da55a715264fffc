"""HTTPS on the proxy port, end to end: real gateways, real TLS sockets, curl and aiohttp.

    identity        a verified client certificate names its principal (via "cert"),
                    Authorization wins over it, one naming nobody is 401
    refusals        plain HTTP on the TLS port is closed unanswered; expired and
                    wrong-CA certificates (and none, when required) end the handshake
    rotation        SIGHUP under load swaps certificate and key with no failed
                    request, kept-alive connections included; a broken pair keeps
                    the old one and counts a failed reload; every worker reloads
    upstream        an https sandbox behind a test CA, trusted with upstream.ca_file
    explain         ``explain --cert`` and the live gateway agree

Every certificate is made here (tests/certs.py); the admin port stays plain HTTP.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from certs import Pair, client_pair, days_ago, server_pair, write_ca
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support import (
    Creds,
    GatewayProc,
    Proc,
    SandboxProc,
    cli,
    free_port,
    gateway_policy,
    launch_gateway,
    poll,
)

from gateway import cli as gateway_cli

pytestmark = pytest.mark.e2e

TRASH = "/crm-core/v1/records/trash"
RESTORE = "/crm-core/v1/records/bulk/restore"
CERT_PRINCIPALS = """\
  - name: billing-svc
    role: MEMBER
    cert: {uri: "spiffe://corp/billing"}
  - name: reports-svc
    role: VIEWER
    cert: {dns: "reports.internal"}
"""


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: trustme.CA  # the gateway's server certificates
    ca_file: Path
    clients: trustme.CA  # client certificates
    client_ca_file: Path
    server: Pair
    billing: Pair  # MEMBER by URI
    reports: Pair  # VIEWER by DNS name
    stranger: Pair  # from the client CA, naming no principal
    expired: Pair  # billing's name, expired
    outsider: Pair  # billing's name, from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, clients = trustme.CA(), trustme.CA()
    billing = "spiffe://corp/billing"
    return Pki(
        folder=folder,
        ca=ca,
        ca_file=write_ca(ca, folder / "ca.pem"),
        clients=clients,
        client_ca_file=write_ca(clients, folder / "clients-ca.pem"),
        server=server_pair(ca, folder),
        billing=client_pair(clients, folder, "billing", uri=billing, cn="billing"),
        reports=client_pair(clients, folder, "reports", dns=("reports.internal",)),
        stranger=client_pair(clients, folder, "stranger", uri="spiffe://corp/stranger"),
        expired=client_pair(clients, folder, "expired", uri=billing, not_after=days_ago(1)),
        outsider=client_pair(trustme.CA(), folder, "outsider", uri=billing),
    )


def tls_policy(creds: Creds) -> str:
    return gateway_policy(creds, more_principals=CERT_PRINCIPALS)


def tls_block(pki: Pki, pair: Pair | None = None, **extra: Any) -> dict[str, Any]:
    pair = pair or pki.server
    return {
        "cert_file": str(pair.cert),
        "key_file": str(pair.key),
        "client_ca_file": str(pki.client_ca_file),
        **extra,
    }


def https(gateway: GatewayProc, path: str = "") -> str:
    return f"https://127.0.0.1:{gateway.port}{path}"


@pytest.fixture(scope="module")
def tls_gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds, sandbox: SandboxProc, pki: Pki
) -> Iterator[GatewayProc]:
    started = launch_gateway(
        tmp_path_factory.mktemp("tls-gateway"),
        creds,
        sandbox.url,
        policy=tls_policy(creds),
        settings={"tls": tls_block(pki)},
    )
    yield started
    started.proc.kill()


def client_context(pki: Pki, pair: Pair | None = None, *cas: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    for ca in cas:
        context.load_verify_locations(cafile=str(ca))
    if pair is not None:
        context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


def curl_tls(pki: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed (.ci/run installs it before the tests)")
    command = [exe, "-sS", "-o", "-", "-w", "\n%{http_code}", "--cacert", str(pki.ca_file), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20)


def curl_status(pki: Pki, *args: str) -> int:
    done = curl_tls(pki, *args)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.rsplit("\n", 1)[1])


def logged(gateway: GatewayProc, **fields: Any) -> list[dict[str, Any]]:
    """The access lines holding ``fields``, once there is one (the line of a forwarded
    request is written just after its answer went out)."""
    deadline = time.monotonic() + 10
    while True:
        found = [a for a in gateway.access_lines() if fields.items() <= a.items()]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# --- identity --------------------------------------------------------------------------------


def test_curl_with_a_client_certificate_acts_as_its_principal(
    tls_gateway: GatewayProc, sandbox: SandboxProc, pki: Pki
) -> None:
    url = https(tls_gateway, TRASH + "?limit=1")
    assert (
        curl_status(pki, *pki.billing.curl_args(), "-H", "X-Request-ID: cert-billing", url) == 200
    )
    (line,) = logged(tls_gateway, request_id="cert-billing")
    assert (line["principal"], line["role"], line["via"]) == ("billing-svc", "MEMBER", "cert")
    assert sandbox.last()["path"] == TRASH

    body = json.dumps({"recordIds": sandbox.trash_ids(1)})
    restore = [
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        https(tls_gateway, RESTORE),
    ]
    assert curl_status(pki, *pki.billing.curl_args(), *restore) == 200
    with sandbox.untouched():  # reports-svc is a VIEWER
        assert curl_status(pki, *pki.reports.curl_args(), *restore) == 403


async def test_authorization_wins_over_a_client_certificate(
    tls_gateway: GatewayProc, sandbox: SandboxProc, pki: Pki, creds: Creds
) -> None:
    context = client_context(pki, pki.billing)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": creds.bearer("VIEWER"), "X-Request-ID": "cert-and-token"}
        async with session.get(https(tls_gateway, TRASH), ssl=context, headers=headers) as got:
            assert got.status == 200
        with sandbox.untouched():
            headers = {"Authorization": "Bearer sgw_unknown", "X-Request-ID": "cert-bad-token"}
            async with session.get(https(tls_gateway, TRASH), ssl=context, headers=headers) as got:
                assert got.status == 401
    (line,) = logged(tls_gateway, request_id="cert-and-token")
    assert (line["principal"], line["via"]) == ("test-viewer", "token")
    (line,) = logged(tls_gateway, request_id="cert-bad-token")
    assert line["reason"] == "unknown bearer token"


def test_a_certificate_naming_no_principal_is_401_and_none_at_all_too(
    tls_gateway: GatewayProc, sandbox: SandboxProc, pki: Pki
) -> None:
    url = https(tls_gateway, TRASH)
    with sandbox.untouched():
        assert (
            curl_status(pki, *pki.stranger.curl_args(), "-H", "X-Request-ID: stranger", url) == 401
        )
        assert curl_status(pki, "-H", "X-Request-ID: no-cert", url) == 401
    (line,) = logged(tls_gateway, request_id="stranger")
    assert line["reason"] == "client certificate matches no principal (uri spiffe://corp/stranger)"
    assert logged(tls_gateway, request_id="no-cert")[0]["reason"] == "no credentials"


# --- what never reaches a handler --------------------------------------------------------------


def test_plain_http_to_the_tls_port_is_closed_unanswered_and_the_admin_port_stays_http(
    tls_gateway: GatewayProc, pki: Pki
) -> None:
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /crm-core/v1/records/trash HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert sock.recv(1024) == b""  # no HTTP answer, no TLS alert: closed
    done = curl_tls(pki, f"http://127.0.0.1:{tls_gateway.port}{TRASH}")
    assert done.returncode == 52, done.stderr  # curl: "Empty reply from server"
    assert tls_gateway.admin("/readyz")[0] == 200  # plain HTTP
    assert curl_status(pki, *pki.billing.curl_args(), https(tls_gateway, TRASH)) == 200


@pytest.mark.parametrize("who", ["expired", "outsider"])
async def test_expired_and_wrong_ca_certificates_end_the_handshake(
    tls_gateway: GatewayProc, sandbox: SandboxProc, pki: Pki, who: str
) -> None:
    """Client certificates are optional on this gateway: one that is sent is still verified."""
    pair: Pair = getattr(pki, who)
    with sandbox.untouched():
        done = curl_tls(pki, *pair.curl_args(), https(tls_gateway, TRASH))
        assert done.returncode != 0 and done.stdout == "\n000", done
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(
                    https(tls_gateway, TRASH), ssl=client_context(pki, pair)
                ) as got:
                    await got.read()
    assert curl_status(pki, *pki.billing.curl_args(), https(tls_gateway, TRASH)) == 200


async def test_required_client_certificates_refuse_a_handshake_without_one(
    start_gateway: Callable[..., GatewayProc], sandbox: SandboxProc, pki: Pki, creds: Creds
) -> None:
    gw = start_gateway(
        policy=tls_policy(creds), settings={"tls": tls_block(pki, require_client_cert=True)}
    )
    with sandbox.untouched():
        done = curl_tls(pki, "-H", f"Authorization: {creds.bearer('OWNER')}", https(gw, TRASH))
        assert done.returncode != 0 and done.stdout == "\n000", done
    assert curl_status(pki, *pki.reports.curl_args(), https(gw, TRASH)) == 200
    assert [a["via"] for a in gw.access_lines()] == ["cert"]  # the refused one never got in


# --- rotation ---------------------------------------------------------------------------------


def serial(pair: Pair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


async def served_serial(gateway: GatewayProc, context: ssl.SSLContext) -> int:
    """The serial of the certificate a new connection to the proxy port is shown."""
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


def install(pair: Pair, into: Pair) -> None:
    """Put ``pair`` where the config points, each file replaced at once (as a
    Kubernetes Secret update or certbot's renewal hook would)."""
    for source, target in ((pair.cert, into.cert), (pair.key, into.key)):
        staged = target.with_suffix(".staged")
        shutil.copy(source, staged)
        os.replace(staged, target)


def reload_count(gateway: GatewayProc) -> dict[str, float]:
    status, text = gateway.admin("/metrics")
    assert status == 200
    return {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
        if s.name == "gateway_config_reloads_total"
    }


async def sighup(gateway: GatewayProc, event: str) -> None:
    seen = sum(1 for e in gateway.events() if e["event"] == event)
    gateway.proc.popen.send_signal(signal.SIGHUP)
    await poll(lambda: sum(1 for e in gateway.events() if e["event"] == event) > seen)


async def test_rotation_under_load_fails_no_request(
    start_gateway: Callable[..., GatewayProc], pki: Pki, creds: Creds, tmp_path: Path
) -> None:
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    first = server_pair(pki.ca, tmp_path, "first")
    successor_ca = trustme.CA()  # the renewal comes from a new CA: clients trust both
    second = server_pair(successor_ca, tmp_path, "second")
    install(first, live)
    gw = start_gateway(policy=tls_policy(creds), settings={"tls": tls_block(pki, live)})
    trusts_both = client_context(pki, pki.reports, write_ca(successor_ca, tmp_path / "next.pem"))
    url = https(gw, TRASH + "?limit=1")
    outcomes: list[str] = []
    rotated = asyncio.Event()
    # For each connection the kept-alive session opens: was the rotation done by then?
    kept_alive_opened: list[bool] = []

    async def opened(*_: object) -> None:
        kept_alive_opened.append(rotated.is_set())

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(opened)

    async def load(connector: aiohttp.TCPConnector, after_rotation: int = 40) -> None:
        """Requests one after another until ``after_rotation`` of them followed the
        rotation (and at most 400 in all, should it never come)."""
        traced = [] if connector.force_close else [tracing]
        async with aiohttp.ClientSession(connector=connector, trace_configs=traced) as session:
            for _ in range(400):
                try:
                    async with session.get(url) as got:
                        await got.read()
                        outcomes.append(str(got.status))
                except aiohttp.ClientError as exc:
                    outcomes.append(f"failed: {exc!r}")
                if rotated.is_set():
                    after_rotation -= 1
                    if after_rotation <= 0:
                        return

    async def rotate() -> None:
        await poll(lambda: len(outcomes) >= 30)
        install(second, live)
        await sighup(gw, "reloaded")
        rotated.set()

    assert await served_serial(gw, trusts_both) == serial(first)
    await asyncio.gather(
        load(aiohttp.TCPConnector(ssl=trusts_both, limit=1)),  # one connection throughout
        load(aiohttp.TCPConnector(ssl=trusts_both, force_close=True)),  # a handshake each
        load(aiohttp.TCPConnector(ssl=trusts_both, force_close=True)),
        rotate(),
    )
    assert [o for o in outcomes if o != "200"] == []
    assert await served_serial(gw, trusts_both) == serial(second)
    # One connection, opened before the rotation, served the kept-alive requests throughout.
    assert kept_alive_opened == [False]
    assert reload_count(gw) == {"success": 1, "failure": 0}


async def test_a_broken_new_pair_keeps_the_old_one_and_counts_a_failure(
    start_gateway: Callable[..., GatewayProc], pki: Pki, creds: Creds, tmp_path: Path
) -> None:
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    first, second = server_pair(pki.ca, tmp_path, "first"), server_pair(pki.ca, tmp_path, "second")
    install(first, live)
    gw = start_gateway(policy=tls_policy(creds), settings={"tls": tls_block(pki, live)})
    shutil.copy(second.cert, live.cert)  # the new certificate, but the key not (yet)
    await sighup(gw, "reload_failed")
    (failed,) = [e for e in gw.events() if e["event"] == "reload_failed"]
    assert failed["errors"] == [
        f"{gw.config_path}:{line_of(gw.config_path, 'key_file')}: tls.key_file:"
        f" the key in {live.key} does not match the certificate"
    ]
    assert reload_count(gw) == {"success": 0, "failure": 1}
    context = client_context(pki, pki.reports)
    assert await served_serial(gw, context) == serial(first)
    assert curl_status(pki, *pki.reports.curl_args(), https(gw, TRASH)) == 200
    shutil.copy(second.key, live.key)  # the key arrives: the next SIGHUP takes both
    await sighup(gw, "reloaded")
    assert await served_serial(gw, context) == serial(second)
    assert reload_count(gw) == {"success": 1, "failure": 1}


def line_of(path: Path, key: str) -> int:
    lines = path.read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if f'"{key}"' in text or f"{key}:" in text)


async def test_every_worker_reloads_on_sighup(
    pki: Pki, creds: Creds, sandbox: SandboxProc, tmp_path: Path
) -> None:
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    first, second = server_pair(pki.ca, tmp_path, "first"), server_pair(pki.ca, tmp_path, "second")
    install(first, live)
    workers = launch_gateway(
        tmp_path / "workers",
        creds,
        sandbox.url,
        policy=tls_policy(creds),
        settings={"tls": tls_block(pki, live)},
        workers=2,
    )
    proc = workers.proc
    try:
        context = client_context(pki)
        install(second, live)
        seen = len(workers.events())
        proc.popen.send_signal(signal.SIGHUP)
        await poll(lambda: [e["event"] for e in workers.events()[seen:]].count("reloaded") == 2)
        # SO_REUSEPORT spreads new connections over both workers: all show the new one.
        assert {await served_serial(workers, context) for _ in range(12)} == {serial(second)}
    finally:
        proc.stop()


# --- an https upstream behind an internal CA ----------------------------------------------------


@dataclass
class HttpsSandbox:
    proc: Proc
    port: int
    context: ssl.SSLContext

    def count(self) -> int:
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=5)
        try:
            conn.request("GET", "/_sandbox/requests")
            return int(json.loads(conn.getresponse().read())["count"])
        finally:
            conn.close()


@pytest.fixture
def https_sandbox(tmp_path: Path, creds: Creds) -> Iterator[tuple[HttpsSandbox, Path]]:
    upstream_ca = trustme.CA()
    ca_file = write_ca(upstream_ca, tmp_path / "upstream-ca.pem")
    pair = server_pair(upstream_ca, tmp_path, "upstream", hosts=("localhost",))
    port = free_port()
    args = [
        cli(), "sandbox", "--listen", f"127.0.0.1:{port}", "--api-key", creds.api_key,
        "--api-secret-file", str(creds.secret_file),
        "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
    ]  # fmt: skip
    proc = Proc(f"https sandbox :{port}", args, tmp_path / "https-sandbox.stderr")
    sandbox = HttpsSandbox(proc, port, ssl.create_default_context(cafile=str(ca_file)))
    proc.wait_ready(lambda: sandbox.count() >= 0)
    yield sandbox, ca_file
    proc.kill()


@pytest.fixture
def start_at_upstream(tmp_path: Path, creds: Creds) -> Iterator[Callable[..., GatewayProc]]:
    """``start(url, ca_file)``: a gateway in front of ``url``, trusting ``ca_file``."""
    started: list[GatewayProc] = []

    def start(url: str, ca_file: Path | None) -> GatewayProc:
        workdir = tmp_path / f"gateway-{len(started)}"
        extra = {"ca_file": str(ca_file)} if ca_file is not None else None
        started.append(launch_gateway(workdir, creds, url, upstream=extra))
        return started[-1]

    yield start
    for gateway in started:
        gateway.proc.kill()


async def test_an_https_upstream_behind_a_test_ca_is_trusted_through_ca_file(
    start_at_upstream: Callable[..., GatewayProc],
    https_sandbox: tuple[HttpsSandbox, Path],
    creds: Creds,
    http_session: aiohttp.ClientSession,
) -> None:
    upstream, ca_file = https_sandbox
    by_name = f"https://localhost:{upstream.port}"
    with_ca = start_at_upstream

    headers = {"Authorization": creds.bearer("VIEWER")}
    trusted = with_ca(by_name, ca_file)
    before = upstream.count()
    reply = await trusted.send(http_session, "GET", TRASH + "?limit=1", headers=headers)
    assert reply.status == 200, reply.body
    assert upstream.count() == before + 1
    # Verification is always on: the system's CAs do not know the test CA, and a
    # certificate for "localhost" is no certificate for 127.0.0.1.
    for gw in (with_ca(by_name, None), with_ca(f"https://127.0.0.1:{upstream.port}", ca_file)):
        reply = await gw.send(http_session, "GET", TRASH, headers=headers)
        assert (reply.status, reply.headers["X-Gateway-Error"]) == (502, "UpstreamUnavailable")
    assert upstream.count() == before + 1


# --- explain --cert and the live gateway ---------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "method", "path", "token", "expected"),
    [
        ("billing", "GET", TRASH, None, "forward"),
        ("reports", "GET", TRASH, None, "forward"),
        ("reports", "DELETE", "/crm-core/v1/records/x", None, "404 RouteNotFound"),
        ("stranger", "GET", TRASH, None, "401 Unauthorized"),
        ("billing", "GET", TRASH, "sgw_unknown", "401 Unauthorized"),
        ("expired", "GET", TRASH, None, "handshake"),
        ("outsider", "GET", TRASH, None, "handshake"),
    ],
)
def test_explain_cert_and_the_live_gateway_agree(
    tls_gateway: GatewayProc,
    sandbox: SandboxProc,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    who: str,
    method: str,
    path: str,
    token: str | None,
    expected: str,
) -> None:
    pair: Pair = getattr(pki, who)
    args = ["explain", "--config", str(tls_gateway.config_path), "--cert", str(pair.cert)]
    args += ["--token", token] if token else []
    code = gateway_cli.main([*args, method, path])
    lines = capsys.readouterr().out.splitlines()
    verdict = lines[-1]
    if verdict.startswith("would forward"):
        explained = "forward"
    elif "TLS handshake" in verdict:
        explained = "handshake"
    else:
        explained = verdict.removeprefix("would refuse: ")
    assert code == (0 if explained == "forward" else 1)

    extra = ["-H", f"Authorization: Bearer {token}"] if token else []
    before = sandbox.count()
    done = curl_tls(
        pki, *pair.curl_args(), *extra, "-D", "-", "-X", method, https(tls_gateway, path)
    )
    if done.returncode != 0:
        live = "handshake"
    else:
        status = int(done.stdout.rsplit("\n", 1)[1])
        error = next(
            (h.split(":", 1)[1].strip() for h in done.stdout.splitlines()
             if h.lower().startswith("x-gateway-error:")),
            None,
        )  # fmt: skip
        live = "forward" if error is None and sandbox.count() == before + 1 else f"{status} {error}"
    assert (explained, live) == (expected, expected), lines


async def test_a_certificate_ending_soon_is_logged_at_start_and_at_each_reload(
    start_gateway: Callable[..., GatewayProc], pki: Pki, creds: Creds, tmp_path: Path
) -> None:
    soon = server_pair(pki.ca, tmp_path, "soon", days=5)
    gw = start_gateway(policy=tls_policy(creds), settings={"tls": tls_block(pki, soon)})
    (warning,) = [e["warning"] for e in gw.events() if e["event"] == "config_warning"]
    assert f"tls.cert_file: {soon.cert}: the certificate expires on " in warning
    await sighup(gw, "reloaded")
    (reloaded,) = [e for e in gw.events() if e["event"] == "reloaded"]
    assert reloaded["warnings"] == [warning]
    assert curl_status(pki, *pki.reports.curl_args(), https(gw, TRASH)) == 200
