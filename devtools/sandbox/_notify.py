"""Graph rich-notification encryption (and the reference decryption used by tests).

Exactly as Microsoft Graph does it ("Set up change notifications that include resource data"):

* a fresh 32-byte symmetric key per notification item;
* ``dataKey``  = base64(RSA-OAEP(SHA-1, MGF1-SHA-1) of the key with the subscription certificate's
  public key);
* ``data``     = base64(AES-256-CBC, PKCS7 padding, IV = first 16 bytes of the key, of the UTF-8
  JSON resource);
* ``dataSignature`` = base64(HMAC-SHA256(key, the *encrypted* data bytes));
* ``encryptionCertificateId`` echoes the subscription's id for the certificate and
  ``encryptionCertificateThumbprint`` is the certificate's SHA-1 thumbprint (hex, upper case).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "RichNotificationError",
    "certificate_thumbprint",
    "decrypt_rich_notification",
    "encrypt_rich_notification",
    "load_encryption_certificate",
]

_OAEP = asym_padding.OAEP(
    mgf=asym_padding.MGF1(algorithm=hashes.SHA1()),
    algorithm=hashes.SHA1(),
    label=None,
)


class RichNotificationError(ValueError):
    """The encrypted content is malformed or its signature does not match."""


def load_encryption_certificate(value: str) -> x509.Certificate:
    """Parse ``encryptionCertificate`` (base64 DER; a PEM or base64-of-PEM is tolerated)."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return x509.load_pem_x509_certificate(text.encode())
    raw = base64.b64decode(text, validate=False)
    if raw.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(raw)
    return x509.load_der_x509_certificate(raw)


def certificate_thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def encrypt_rich_notification(
    resource: dict[str, Any], cert: x509.Certificate, certificate_id: str
) -> dict[str, str]:
    """The ``encryptedContent`` object for ``resource`` (a JSON-able dict)."""
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("encryption certificate must hold an RSA key")
    key = os.urandom(32)
    padder = padding.PKCS7(128).padder()
    plain = json.dumps(resource, separators=(",", ":")).encode("utf-8")
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    data = encryptor.update(padded) + encryptor.finalize()
    signature = hmac.new(key, data, hashlib.sha256).digest()
    return {
        "data": base64.b64encode(data).decode("ascii"),
        "dataSignature": base64.b64encode(signature).decode("ascii"),
        "dataKey": base64.b64encode(public_key.encrypt(key, _OAEP)).decode("ascii"),
        "encryptionCertificateId": certificate_id,
        "encryptionCertificateThumbprint": certificate_thumbprint(cert),
    }


def decrypt_rich_notification(
    encrypted_content: dict[str, Any], private_key: rsa.RSAPrivateKey
) -> dict[str, Any]:
    """Reverse of :func:`encrypt_rich_notification` (the reference for tests): RSA-OAEP(SHA-1)
    to recover the key, constant-time HMAC-SHA256 check over the encrypted bytes, AES-CBC."""
    try:
        key = private_key.decrypt(base64.b64decode(encrypted_content["dataKey"]), _OAEP)
        data = base64.b64decode(encrypted_content["data"])
        expected = base64.b64decode(encrypted_content["dataSignature"])
    except Exception as exc:
        raise RichNotificationError(f"malformed encryptedContent: {exc}") from exc
    actual = hmac.new(key, data, hashlib.sha256).digest()
    if not hmac.compare_digest(actual, expected):
        raise RichNotificationError("dataSignature does not match the encrypted data")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(padded) + unpadder.finalize()
    result: dict[str, Any] = json.loads(plain.decode("utf-8"))
    return result
