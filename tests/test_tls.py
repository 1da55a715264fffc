"""gateway/tls.py: the proxy port's contexts, their rotation, upstream trust.

Handshakes here run in memory (two ``SSLObject``s and their BIOs, pumped by
hand), so each test sees exactly what a client of the proxy port would:
the version, cipher and ALPN negotiated, which certificate the server
presented, whether a client certificate was accepted. End-to-end tests over
real sockets are in tests/test_e2e_tls.py.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from certs import NOW, Pair, client_pair, days_ago, server_pair, write_ca
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import tls
from gateway.identity import PeerCert, peer_cert

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


@dataclass(frozen=True)
class Material:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    require_client_cert: bool = False


def material(pair: Pair, client_ca: Path | None = None, *, require: bool = False) -> Material:
    return Material(str(pair.cert), str(pair.key), str(client_ca) if client_ca else None, require)


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, host: str = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject, list[MemoryLink]]:
    """A completed handshake between the two contexts (SSLError if either refuses)."""
    link = MemoryLink(server, client, host)
    link.handshake()
    return link.server, link.client, [link]


class MemoryLink:
    """A server and a client SSLObject joined by memory BIOs."""

    def __init__(self, server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> None:
        self.s_in, self.s_out, self.c_in, self.c_out = (ssl.MemoryBIO() for _ in range(4))
        self.server = server.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client.wrap_bio(self.c_in, self.c_out, server_hostname=host)

    def pump(self) -> None:
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def handshake(self) -> None:
        done: set[str] = set()
        for _ in range(20):
            for name, side in (("client", self.client), ("server", self.server)):
                if name not in done:
                    try:
                        side.do_handshake()
                        done.add(name)
                    except ssl.SSLWantReadError:
                        pass
                self.pump()
            if len(done) == 2:
                # TLS 1.3: the server's verdict on a client certificate comes after
                # the client's handshake is done; one round trip brings it.
                self.exchange(b"ping")
                return
        raise AssertionError("the handshake did not finish")

    def exchange(self, data: bytes) -> bytes:
        self.client.write(data)
        self.pump()
        got = self.server.read(len(data))
        self.server.write(got)
        self.pump()
        try:
            return self.client.read(len(data))
        finally:
            self.pump()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA, client_ca: trustme.CA) -> Files:
    return Files(tmp_path, ca, client_ca)


class Files:
    def __init__(self, folder: Path, ca: trustme.CA, client_ca: trustme.CA) -> None:
        self.folder, self.ca, self.client_ca_obj = folder, ca, client_ca
        self.ca_file = write_ca(ca, folder / "ca.pem")
        self.client_ca = write_ca(client_ca, folder / "clients-ca.pem")

    def client_context(self, pair: Pair | None = None, **options: object) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if pair is not None:
            context.load_cert_chain(str(pair.cert), str(pair.key))
        for name, value in options.items():
            setattr(context, name, value)
        return context


def served_serial(server: ssl.SSLContext, files: Files) -> int:
    _, client, _ = handshake(server, files.client_context())
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial(pair: Pair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


# --- what the proxy port speaks --------------------------------------------------------------


def test_tls_1_3_by_default_and_1_2_with_forward_secret_aead_suites(files: Files) -> None:
    server = tls.server_context(material(server_pair(files.ca, files.folder)))
    _, client, _ = handshake(server, files.client_context())
    assert client.version() == "TLSv1.3"
    _, client, _ = handshake(server, files.client_context(maximum_version=ssl.TLSVersion.TLSv1_2))
    assert client.version() == "TLSv1.2"
    cipher = client.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE-") and cipher[0] in tls.TLS12_CIPHERS


def test_http_1_1_is_the_only_alpn_protocol(files: Files) -> None:
    server = tls.server_context(material(server_pair(files.ca, files.folder)))
    offered = files.client_context()
    offered.set_alpn_protocols(["h2", "http/1.1"])
    _, client, _ = handshake(server, offered)
    assert client.selected_alpn_protocol() == "http/1.1"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_1_1_and_cbc_suites_are_refused(files: Files) -> None:
    server = tls.server_context(material(server_pair(files.ca, files.folder)))
    old = files.client_context()
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what OpenSSL 3 would not
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL"):  # the server's verdict
        handshake(server, old)
    cbc = files.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    with pytest.raises(ssl.SSLError, match="NO_SHARED_CIPHER"):
        handshake(server, cbc)


def test_client_certificates_are_verified_against_the_client_ca(files: Files) -> None:
    server = tls.server_context(material(server_pair(files.ca, files.folder), files.client_ca))
    billing = client_pair(files.client_ca_obj, files.folder, "billing", cn="billing")
    served, _, _ = handshake(server, files.client_context(billing))
    assert peer_cert(served.getpeercert()) == PeerCert(cns=("billing",))
    # Optional: no certificate is fine, and then there is no peer certificate.
    served, _, _ = handshake(server, files.client_context())
    assert peer_cert(served.getpeercert()) is None
    # A certificate from another CA, or expired, ends the handshake even when optional.
    stranger = client_pair(trustme.CA(), files.folder, "stranger", cn="billing")
    expired = client_pair(
        files.client_ca_obj, files.folder, "old", cn="billing", not_after=days_ago(1)
    )
    server_only = client_pair(
        files.client_ca_obj, files.folder, "server-only", cn="billing", usage=SERVER_AUTH
    )
    for pair in (stranger, expired, server_only):
        with pytest.raises(ssl.SSLError):
            handshake(server, files.client_context(pair))


def test_no_session_tickets_once_client_certificates_carry_identity(files: Files) -> None:
    """A resumed session would keep a certificate whose CA a rotation dropped."""
    pair = server_pair(files.ca, files.folder)
    listener = tls.ServerTls(material(pair))
    _, client, _ = handshake(listener.context, files.client_context())
    assert client.session is not None and client.session.has_ticket
    listener.reload(material(pair, files.client_ca))
    _, client, _ = handshake(listener.context, files.client_context())
    assert client.session is None or not client.session.has_ticket


def test_required_client_certificates_refuse_a_client_without_one(files: Files) -> None:
    server = tls.server_context(
        material(server_pair(files.ca, files.folder), files.client_ca, require=True)
    )
    with pytest.raises(ssl.SSLError):
        handshake(server, files.client_context())


# --- rotation -------------------------------------------------------------------------------


def test_reload_serves_new_handshakes_and_keeps_established_ones(files: Files) -> None:
    old, new = (
        server_pair(files.ca, files.folder, "old"),
        server_pair(files.ca, files.folder, "new"),
    )
    listener = tls.ServerTls(material(old))
    _, _, (established,) = handshake(listener.context, files.client_context())
    assert served_serial(listener.context, files) == serial(old)
    listener.reload(material(new))
    assert served_serial(listener.context, files) == serial(new)
    assert established.exchange(b"still here") == b"still here"


def test_a_broken_pair_keeps_the_running_one(files: Files) -> None:
    old, new = (
        server_pair(files.ca, files.folder, "old"),
        server_pair(files.ca, files.folder, "new"),
    )
    listener = tls.ServerTls(material(old))
    with pytest.raises(tls.TlsError, match="does not match"):
        listener.reload(Material(str(new.cert), str(old.key)))
    with pytest.raises(tls.TlsError, match="cannot read"):
        listener.reload(Material(str(new.cert), str(files.folder / "gone.key")))
    assert served_serial(listener.context, files) == serial(old)


def test_reload_swaps_the_client_ca_and_whether_certificates_are_required(files: Files) -> None:
    pair = server_pair(files.ca, files.folder)
    listener = tls.ServerTls(material(pair, files.client_ca))
    billing = client_pair(files.client_ca_obj, files.folder, "billing", cn="billing")
    handshake(listener.context, files.client_context(billing))
    successor = trustme.CA()
    next_ca = write_ca(successor, files.folder / "next-ca.pem")
    listener.reload(material(pair, next_ca, require=True))
    with pytest.raises(ssl.SSLError):  # issued by the CA that was dropped
        handshake(listener.context, files.client_context(billing))
    with pytest.raises(ssl.SSLError):  # none at all, now that they are required
        handshake(listener.context, files.client_context())
    renewed = client_pair(successor, files.folder, "renewed", cn="billing")
    served, _, _ = handshake(listener.context, files.client_context(renewed))
    assert peer_cert(served.getpeercert()) == PeerCert(cns=("billing",))
    listener.reload(material(pair))  # client certificates off again
    served, _, _ = handshake(listener.context, files.client_context(renewed))
    assert peer_cert(served.getpeercert()) is None


# --- the names matched, live and in explain --------------------------------------------------


def test_explain_reads_the_same_names_as_the_live_handshake(files: Files) -> None:
    server = tls.server_context(material(server_pair(files.ca, files.folder), files.client_ca))
    pairs = [
        client_pair(files.client_ca_obj, files.folder, "a", uri="spiffe://corp/billing"),
        client_pair(
            files.client_ca_obj, files.folder, "b", dns=("b.internal", "B2.internal"), cn="b"
        ),
        client_pair(files.client_ca_obj, files.folder, "c", cn="only-a-cn"),
    ]
    for pair in pairs:
        served, _, _ = handshake(server, files.client_context(pair))
        live = peer_cert(served.getpeercert())
        explained = tls.certificate_identity(tls.read_certificates(str(pair.cert))[0])
        assert live == explained, pair.cert.name


def test_verify_client_accepts_the_cas_own_and_says_why_not_otherwise(files: Files) -> None:
    def verdict(pair: Pair) -> str:
        chain = tls.read_certificates(str(pair.cert))
        try:
            tls.verify_client(chain, str(files.client_ca), NOW)
        except tls.TlsError as exc:
            return str(exc)
        return "ok"

    ca = files.client_ca_obj
    assert verdict(client_pair(ca, files.folder, "ok", cn="x")) == "ok"
    assert verdict(client_pair(trustme.CA(), files.folder, "other", cn="x")) == (
        f"it is not issued by a CA in {files.client_ca}"
    )
    expired = client_pair(ca, files.folder, "expired", cn="x", not_after=days_ago(2))
    assert verdict(expired).startswith("the certificate expired on ")
    future = client_pair(ca, files.folder, "future", cn="x", not_before=NOW + dt.timedelta(1))
    assert verdict(future).startswith("the certificate is not valid before ")
    server_only = client_pair(ca, files.folder, "server-only", cn="x", usage=SERVER_AUTH)
    assert verdict(server_only) == "its extendedKeyUsage does not allow TLS client authentication"


def test_verify_client_follows_intermediates_as_the_handshake_does(files: Files) -> None:
    """A client that sends its intermediate along is verified by both alike."""
    root = trustme.CA()
    root_file = write_ca(root, files.folder / "root.pem")
    leaf = root.create_child_ca().issue_cert("svc.internal", common_name="svc")
    pair = Pair(files.folder / "chained.crt", files.folder / "chained.key")
    pair.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    chain = tls.read_certificates(str(pair.cert))
    assert len(chain) == 2
    tls.verify_client(chain, str(root_file), NOW)
    with pytest.raises(tls.TlsError, match="not issued by a CA"):
        tls.verify_client(chain[:1], str(root_file), NOW)  # the intermediate left out
    server = tls.server_context(material(server_pair(files.ca, files.folder), root_file))
    served, _, _ = handshake(server, files.client_context(pair))
    assert peer_cert(served.getpeercert()) == PeerCert(dns=("svc.internal",), cns=("svc",))


# --- an https upstream behind an internal CA --------------------------------------------------


def test_upstream_trust_is_the_files_cas_only_with_host_names_checked(files: Files) -> None:
    upstream = tls.server_context(
        material(server_pair(files.ca, files.folder, hosts=("up.internal",)))
    )
    trust = tls.upstream_context(str(files.ca_file))
    assert trust.verify_mode == ssl.CERT_REQUIRED and trust.check_hostname
    handshake(upstream, trust, host="up.internal")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(upstream, trust, host="other.internal")
    elsewhere = tls.upstream_context(str(files.client_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(upstream, elsewhere, host="up.internal")


def test_unusable_files_are_tls_errors_in_words(files: Files, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match="holds no PEM certificate"):
        tls.read_certificates(str(junk))
    with pytest.raises(tls.TlsError, match="holds no PEM certificate"):
        tls.upstream_context(str(junk))
    with pytest.raises(tls.TlsError, match=r"cannot read .*missing\.pem: No such file"):
        tls.read_certificates(str(tmp_path / "missing.pem"))
