"""Certificates made for the test that uses them: never a key in the repository.

``trustme`` makes the CAs and most leaves; a leaf with a URI name (a SPIFFE ID),
which trustme does not make, is signed with a trustme CA's key through
``cryptography``. Each ``Pair`` is written to files, as the gateway reads them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as files."""

    cert: Path
    key: Path

    def curl_args(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key)]


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def write_leaf(leaf: trustme.LeafCert, folder: Path, name: str) -> Pair:
    pair = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    pair.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


def server_pair(
    ca: trustme.CA,
    folder: Path,
    name: str = "server",
    *,
    days: float = 365,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> Pair:
    leaf = ca.issue_cert(*hosts, not_after=NOW + dt.timedelta(days=days))
    return write_leaf(leaf, folder, name)


def client_pair(
    ca: trustme.CA,
    folder: Path,
    name: str,
    *,
    uri: str | None = None,
    dns: tuple[str, ...] = (),
    cn: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Pair:
    """A client certificate naming ``uri`` / ``dns`` / ``cn``, signed by ``ca``
    (``usage``: its extendedKeyUsage, e.g. SERVER_AUTH for one no client may use)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    after = not_after or NOW + dt.timedelta(days=30)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    if uri is not None:
        names.append(x509.UniformResourceIdentifier(uri))
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "solapi-gateway tests")]
    if cn is not None:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or min(NOW, after) - dt.timedelta(days=30))
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


def short_lived_ca(path: Path, *, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    """A self-signed CA certificate (trustme's live for years) with this validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short-lived test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
