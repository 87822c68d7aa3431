"""Rich-notification decryption, against an independent implementation of Graph's scheme.

The encryptor below is written from Graph's documentation ("Set up change notifications that
include resource data", section "Decrypting resource data"), not from our decryptor: a fresh
32-byte AES key; RSA-OAEP (SHA-1) wraps it with the certificate's public key; AES-256-CBC with
PKCS7 padding and IV = the key's first 16 bytes; HMAC-SHA256 of the ciphertext under the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from connector_core.adapters.notification_crypto import NotificationDecryptor
from connector_core.errors import AuthenticationError, InvalidInputError, SettingsError
from devtools.dev_secrets import new_self_signed_cert
from devtools.sandbox._notify import encrypt_rich_notification


def make_cert(cn: str = "vv-test") -> tuple[x509.Certificate, str]:
    key, cert = new_self_signed_cert(cn, days=1)
    pem = (
        cert.public_bytes(serialization.Encoding.PEM).decode()
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    )
    return cert, pem


CERT, PEM = make_cert()
RESOURCE = {
    "eventType": "Microsoft.Communication.CallRosterUpdate",
    "eventDateTime": "2026-03-01T10:00:00.0000000Z",
    "activeParticipants@joined": [{"Id": "p1", "Identity": {"Guest": {"Id": "p1"}}}],
}


def graph_encrypt(resource: dict[str, Any], cert: x509.Certificate) -> dict[str, str]:
    key = os.urandom(32)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(json.dumps(resource).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    data = encryptor.update(padded) + encryptor.finalize()
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    wrapped = public.encrypt(
        key,
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
        ),
    )
    return {
        "data": base64.b64encode(data).decode(),
        "dataSignature": base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode(),
        "dataKey": base64.b64encode(wrapped).decode(),
        "encryptionCertificateId": "cert-1",
        "encryptionCertificateThumbprint": cert.fingerprint(hashes.SHA1()).hex().upper(),
    }


def test_round_trip_with_graphs_scheme() -> None:
    assert NotificationDecryptor(PEM).decrypt(graph_encrypt(RESOURCE, CERT)) == RESOURCE


def test_interoperates_with_the_sandbox_graph() -> None:
    content = encrypt_rich_notification(RESOURCE, CERT, "cert-1")
    assert NotificationDecryptor(PEM).decrypt(content) == RESOURCE


def test_bad_signature_is_refused_before_decrypting() -> None:
    content = graph_encrypt(RESOURCE, CERT)
    data = bytearray(base64.b64decode(content["data"]))
    data[-1] ^= 1
    tampered = {**content, "data": base64.b64encode(bytes(data)).decode()}
    with pytest.raises(AuthenticationError, match="signature"):
        NotificationDecryptor(PEM).decrypt(tampered)
    forged = {**content, "dataSignature": base64.b64encode(b"\0" * 32).decode()}
    with pytest.raises(AuthenticationError, match="signature"):
        NotificationDecryptor(PEM).decrypt(forged)


def test_key_for_another_certificate_is_refused() -> None:
    other, _ = make_cert("someone-else")
    content = graph_encrypt(RESOURCE, other)
    with pytest.raises(AuthenticationError, match="certificate"):
        NotificationDecryptor(PEM).decrypt(content)
    content.pop("encryptionCertificateThumbprint")
    with pytest.raises(AuthenticationError):
        NotificationDecryptor(PEM).decrypt(content)


def test_rollover_bundle_decrypts_for_either_certificate() -> None:
    new_cert, new_pem = make_cert("new")
    both = NotificationDecryptor(new_pem + PEM)
    assert both.decrypt(graph_encrypt(RESOURCE, CERT)) == RESOURCE
    assert both.decrypt(graph_encrypt(RESOURCE, new_cert)) == RESOURCE
    assert len(both.thumbprints) == 2
    der = base64.b64decode(both.encryption_certificate())
    assert x509.load_der_x509_certificate(der) == new_cert  # the first one is active


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.pop("data"),
        lambda c: c.update(dataKey="%%%"),
        lambda c: c.update(data=base64.b64encode(b"short").decode()),
    ],
)
def test_malformed_content(mutate: Any) -> None:
    content = graph_encrypt(RESOURCE, CERT)
    mutate(content)
    with pytest.raises((InvalidInputError, AuthenticationError)):
        NotificationDecryptor(PEM).decrypt(content)


def test_settings_errors_name_the_setting() -> None:
    _, other_pem = make_cert("other")
    cert_only = PEM.split("-----BEGIN PRIVATE KEY-----")[0]
    other_key = "-----BEGIN PRIVATE KEY-----" + other_pem.split("-----BEGIN PRIVATE KEY-----")[1]
    for bad in ("", cert_only, cert_only + other_key):
        with pytest.raises(SettingsError) as info:
            NotificationDecryptor(bad)
        assert info.value.setting == "GRAPH_NOTIFICATION_CERT"
