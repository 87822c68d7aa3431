"""A local certificate authority and a server certificate for the HTTPS sandbox servers.

msal refuses ``http://`` authorities, so the Entra ID stand-in is served over HTTPS with a
certificate issued by a CA generated here. Clients trust it through the standard variables:
``SSL_CERT_FILE`` (httpx with ``trust_env``, the ``ssl`` module) and ``REQUESTS_CA_BUNDLE``
(requests, hence msal). Both point at :attr:`SandboxTls.ca_bundle`, which is certifi's bundle
plus our CA, so setting them process-wide keeps public HTTPS working.

The files are reused across runs while they stay valid (a browser told to trust the CA once
keeps trusting it), and regenerated otherwise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["SERVER_IPS", "SERVER_NAMES", "SandboxTls", "ensure_tls"]

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
_CA_NAME = "EHR virtual-visit connector sandbox CA (local only)"
_MIN_REMAINING = dt.timedelta(days=30)


@dataclass(frozen=True)
class SandboxTls:
    """Paths of the generated PEM files."""

    directory: Path
    ca_cert: Path  # our CA certificate only
    ca_bundle: Path  # certifi's bundle + our CA: safe for SSL_CERT_FILE / REQUESTS_CA_BUNDLE
    server_cert: Path  # leaf + CA chain, for uvicorn's ssl_certfile
    server_key: Path

    def client_env(self) -> dict[str, str]:
        """Environment variables that make httpx, requests and msal trust the sandbox."""
        return {"SSL_CERT_FILE": str(self.ca_bundle), "REQUESTS_CA_BUNDLE": str(self.ca_bundle)}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _make_ca() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server(
    ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _new_key()
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _certifi_bundle() -> bytes:
    """certifi's bundle, plus the certificates of the machine's own trust store when the
    environment names one (``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``, e.g. a corporate
    TLS-inspection CA): whatever inherits the sandbox's ``SSL_CERT_FILE`` (pip, git, ...) keeps
    trusting what it trusted before."""
    import os

    try:
        import certifi

        bundle = Path(certifi.where()).read_bytes()
    except ImportError:  # pragma: no cover - certifi ships with httpx/requests
        bundle = b""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    extra: list[bytes] = []
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if not value or not Path(value).is_file():
            continue
        for part in Path(value).read_bytes().split(begin)[1:]:
            block = begin + part.split(end)[0] + end
            if block not in bundle and block not in extra:
                extra.append(block)
    if extra:
        bundle = bundle.rstrip(b"\n") + b"\n\n# From the environment's trust store\n"
        bundle += b"\n".join(extra) + b"\n"
    return bundle


def _reusable(tls: SandboxTls) -> bool:
    paths = (tls.ca_cert, tls.ca_bundle, tls.server_cert, tls.server_key)
    if not all(p.exists() for p in paths):
        return False
    try:
        ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
        leaf = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
        key = serialization.load_pem_private_key(tls.server_key.read_bytes(), password=None)
        leaf.verify_directly_issued_by(ca)
    except Exception:
        return False
    if leaf.public_key() != key.public_key():
        return False
    deadline = _now() + _MIN_REMAINING
    if leaf.not_valid_after_utc < deadline or ca.not_valid_after_utc < deadline:
        return False
    if ca.public_bytes(serialization.Encoding.PEM) not in tls.ca_bundle.read_bytes():
        return False
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(SERVER_IPS) <= ips


def ensure_tls(directory: Path) -> SandboxTls:
    """Create (or reuse) the CA, the server certificate and the CA bundle in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tls = SandboxTls(
        directory=directory,
        ca_cert=directory / "ca.pem",
        ca_bundle=directory / "ca-bundle.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
    )
    if _reusable(tls):
        return tls
    ca_key, ca_cert = _make_ca()
    key, cert = _make_server(ca_key, ca_cert)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    leaf_pem = cert.public_bytes(serialization.Encoding.PEM)
    # The CA key is not kept: a new server certificate means a new CA, nothing else can be issued.
    _write(tls.server_key, _key_pem(key), private=True)
    _write(tls.server_cert, leaf_pem + ca_pem)
    _write(tls.ca_cert, ca_pem)
    certifi = _certifi_bundle()
    sep = b"" if not certifi or certifi.endswith(b"\n") else b"\n"
    _write(tls.ca_bundle, certifi + sep + b"\n# " + _CA_NAME.encode() + b"\n" + ca_pem)
    return tls
