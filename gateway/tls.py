"""TLS: the proxy port's contexts and their rotation, upstream trust, certificate files.

    ServerTls            the context the proxy port listens with; ``reload`` puts a
                         new certificate, key and client CA in place for every new
                         handshake, while established connections keep theirs
    server_context       one such context: TLS 1.2 or later, ECDHE with AES-GCM or
                         ChaCha20 (TLS 1.3's suites are all AEAD), ALPN ``http/1.1``,
                         no renegotiation; with a client CA, client certificates
                         are verified (required or optional)
    upstream_context     trust for an https upstream behind an internal CA: that
                         file's CAs only, certificate and host name always checked
    cert_file, key_file, ca_bundle
                         the validators of ``tls.*`` and ``upstream.ca_file`` in
                         ``gateway/config.py``: readable, the key the certificate's
                         own, valid now (``lifetime``; ending within 14 days is a
                         warning, ``schema.warn``)
    certificate_identity, verify_client
                         what ``explain --cert`` does with a certificate file

Rotation. asyncio and uvloop wrap every accepted connection with the one
SSLContext the listener was created with, and a context cannot unload its
certificate or forget a CA it loaded. So the listening context is never
changed, except for its verify mode: its SNI callback, which OpenSSL runs on
every ClientHello (with or without a server name), moves the new connection
to the newest context built from the files (``SSL_set_SSL_CTX``). From that
one the handshake takes its certificate, key, verify store and ALPN choice;
the cipher list, protocol versions, options, verify mode and number of session
tickets stay the listening context's, which is why every context here is built
by the same function and ``reload`` copies those settings over. A connection whose handshake is
done keeps what it negotiated: nothing established is dropped.

A client certificate is verified during the handshake (OpenSSL's verifier,
purpose "TLS client"); one that does not verify ends the handshake (the
connection is closed), whether or not certificates are required. The request handler only ever
sees a verified certificate (``getpeercert()`` is empty otherwise).
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

from pydantic import PlainValidator, ValidationInfo

from gateway.identity import PeerCert
from gateway.schema import Invalid, Loc, file_path, read_text, warn

if TYPE_CHECKING:
    # Imported where a certificate is read (at load, and by explain --cert) rather
    # than here: cryptography's bindings cost a plain-HTTP worker about 7 MiB.
    from cryptography import x509

# Mozilla's "intermediate" TLS 1.2 list without the DHE suites: forward secret, AEAD only.
TLS12_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    )
)  # fmt: skip
ALPN: Final = ("http/1.1",)
EXPIRY_WARNING: Final = timedelta(days=14)


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used, in words for the operator."""


class Material(Protocol):
    """What a server context is built from (``tls:`` in gateway.yaml, paths resolved)."""

    @property
    def cert_file(self) -> str: ...
    @property
    def key_file(self) -> str: ...
    @property
    def client_ca_file(self) -> str | None: ...
    @property
    def require_client_cert(self) -> bool: ...


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _Encrypted


def server_context(material: Material) -> ssl.SSLContext:
    """A server context from the files as they are now; TlsError if they cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN))
    # Client-initiated renegotiation costs the server a handshake per request.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    _load_pair(context, material.cert_file, material.key_file)
    if material.client_ca_file is not None:
        _load_cas(context, material.client_ca_file)
        # A resumed session carries the certificate it began with, past a rotation
        # that dropped its CA: with identities at stake, no session tickets.
        context.num_tickets = 0
        context.options |= ssl.OP_NO_TICKET
        context.verify_mode = (
            ssl.CERT_REQUIRED if material.require_client_cert else ssl.CERT_OPTIONAL
        )
    return context


class ServerTls:
    """The proxy port's TLS: ``context`` to listen with, ``reload`` to rotate."""

    def __init__(self, material: Material) -> None:
        self.context = server_context(material)
        self._newest = self.context
        self.context.sni_callback = self._choose

    def reload(self, material: Material) -> None:
        """Serve new handshakes from the files as they are now; on TlsError the
        running certificate, key and client CA stay in place."""
        fresh = server_context(material)
        # What a connection takes from the listening context rather than the newest.
        self.context.verify_mode = fresh.verify_mode
        self.context.num_tickets = fresh.num_tickets
        self.context.options = fresh.options
        self._newest = fresh

    def _choose(self, connection: ssl.SSLObject | ssl.SSLSocket, _: str | None, __: object) -> None:
        if connection.context is not self._newest:
            connection.context = self._newest


def upstream_context(ca_file: str) -> ssl.SSLContext:
    """Trust for an https upstream: only the CAs in ``ca_file`` (not the system's);
    the certificate and its host name are always checked. TlsError if unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cas(context, ca_file)
    return context


def _load_pair(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _Encrypted:
        raise TlsError(f"{key_file} is encrypted: give the key without a passphrase") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"the key in {key_file} does not match the certificate") from None
        raise TlsError(f"{cert_file} / {key_file}: not a PEM certificate and key") from None
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename or key_file}: {exc.strerror}") from None


def _load_cas(context: ssl.SSLContext, ca_file: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:
        raise TlsError(f"{ca_file} holds no PEM certificate") from None
    except OSError as exc:
        raise TlsError(f"cannot read {ca_file}: {exc.strerror}") from None


# --- the checks at load ---------------------------------------------------------------------


def read_certificates(path: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``path``, the first one first; TlsError if none."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {exc.strerror}") from None
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{path} holds no PEM certificate") from None


def check_pair(cert_file: str, key_file: str) -> None:
    """TlsError unless the key is readable, unencrypted and the certificate's own."""
    _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_file, key_file)


def lifetime(cert: x509.Certificate, now: datetime) -> tuple[str | None, str | None]:
    """(problem, warning) about ``cert``'s validity at ``now``: expired or not yet
    valid is a problem; ending within EXPIRY_WARNING is a warning."""
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if after <= now:
        return f"the certificate expired on {_when(after)}", None
    if before > now:
        return f"the certificate is not valid before {_when(before)}", None
    if after - now <= EXPIRY_WARNING:
        days = (after - now).days
        return None, f"the certificate expires on {_when(after)}, in {days} day(s)"
    return None, None


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the files, as gateway.yaml names them (validators of gateway/config.py) -------------


def cert_file(value: object, info: ValidationInfo) -> str:
    """The server certificate: readable PEM, valid now; ending soon is a warning."""
    path = file_path(value, info)
    try:
        leaf = read_certificates(path)[0]
    except TlsError as exc:
        raise Invalid(str(exc)) from None
    problem, warning = lifetime(leaf, datetime.now(UTC))
    if problem is not None:
        raise Invalid(f"{path}: {problem}")
    if warning is not None:
        warn(info, f"{path}: {warning}", at=("tls", "cert_file"))
    return path


def key_file(value: object, info: ValidationInfo) -> str:
    """Its key: readable, unencrypted, and the certificate's own."""
    path = file_path(value, info)
    cert = info.data.get("cert_file")
    try:
        if cert is None:  # the certificate's problem is reported: just read the key
            read_text(path)
        else:
            check_pair(cert, path)
    except TlsError as exc:
        raise Invalid(str(exc)) from None
    return path


def ca_bundle(at: Loc) -> PlainValidator:
    """A CA file (at key path ``at``): certificates OpenSSL can load, not all of them
    expired. One that expired or ends within two weeks is a warning: a bundle may
    hold an old CA beside its successor during a rotation."""

    def run(value: object, info: ValidationInfo) -> str:
        path = file_path(value, info)
        try:
            found = read_certificates(path)
            upstream_context(path)  # OpenSSL must be able to load them too
        except TlsError as exc:
            raise Invalid(str(exc)) from None
        now = datetime.now(UTC)
        lives = [lifetime(cert, now) for cert in found]
        if all(problem is not None for problem, _ in lives):
            why = lives[0][0] if len(lives) == 1 else "every certificate in it expired"
            raise Invalid(f"{path}: {why}")
        for i, (problem, warning) in enumerate(lives):
            if problem or warning:
                which = f"certificate {i + 1} of {len(lives)}: " if len(lives) > 1 else ""
                warn(info, f"{path}: {which}{problem or warning}", at=at)
        return path

    return PlainValidator(run)


# --- explain --cert ------------------------------------------------------------------------


def certificate_identity(cert: x509.Certificate) -> PeerCert:
    """The names a principal's ``cert:`` is matched against, read as
    ``getpeercert()`` gives them on a live connection (``identity.peer_cert``)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(names.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(names.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris = dns = ()
    cns = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return PeerCert(uris=uris, dns=dns, cns=cns)


def verify_client(chain: list[x509.Certificate], ca_file: str, now: datetime) -> None:
    """TlsError unless ``chain[0]`` (with the rest as intermediates) is issued by a CA
    in ``ca_file``, every link valid now, and its key usage allows a TLS client.

    These are the checks OpenSSL makes at the handshake (non-strict, purpose "TLS
    client") that decide in practice: signatures, dates, extendedKeyUsage. The
    handshake itself stays the judge; a certificate OpenSSL refuses for a rarer
    reason (a CA without basicConstraints, say) is explained as if it passed."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    leaf = chain[0]
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise TlsError("its extendedKeyUsage does not allow TLS client authentication")
    anchors, intermediates = read_certificates(ca_file), chain[1:]
    cert = leaf
    for _ in range(_MAX_CHAIN):
        problem, _ = lifetime(cert, now)
        if problem is not None:
            which = (
                "the certificate" if cert is leaf else f"its issuer {cert.subject.rfc4514_string()}"
            )
            raise TlsError(problem.replace("the certificate", which, 1))
        anchor = _issuer(cert, anchors)
        if anchor is not None:
            problem, _ = lifetime(anchor, now)
            if problem is not None:
                raise TlsError(problem.replace("the certificate", "its CA", 1))
            return
        issuer = _issuer(cert, intermediates)
        if issuer is None:
            raise TlsError(f"it is not issued by a CA in {ca_file}")
        cert = issuer
    raise TlsError(f"its chain to a CA in {ca_file} is longer than {_MAX_CHAIN}")


_MAX_CHAIN: Final = 8


def _issuer(cert: x509.Certificate, candidates: list[x509.Certificate]) -> x509.Certificate | None:
    from cryptography.exceptions import InvalidSignature

    for candidate in candidates:
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None
