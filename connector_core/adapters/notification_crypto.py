"""Decryption of Microsoft Graph rich notifications ("change notifications that include resource
data"), exactly as Graph encrypts them:

1. ``dataKey``: base64 of a fresh 32-byte symmetric key, encrypted with the subscription's
   certificate public key, RSA-OAEP (SHA-1 hash and MGF1-SHA-1, Graph's "OAEP padding").
2. ``dataSignature``: base64 HMAC-SHA256 of the *encrypted* ``data`` bytes under that key. It is
   verified (constant time) before anything is decrypted.
3. ``data``: base64 AES-256-CBC ciphertext, PKCS7 padding, IV = the first 16 bytes of the key.

``GRAPH_NOTIFICATION_CERT`` holds one or more PEM certificates and their PEM private keys (two
during a certificate rollover); each key is matched to its certificate, and
``encryptionCertificateThumbprint`` (SHA-1, hex) selects which one decrypts. Keys are parsed
once per process (``Container.notification_crypto``), which matters at hundreds of items a second.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connector_core.errors import AuthenticationError, InvalidInputError, SettingsError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["NotificationDecryptor"]

_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_KEY_BLOCK = re.compile(
    r"-----BEGIN (?:RSA )?PRIVATE KEY-----.+?-----END (?:RSA )?PRIVATE KEY-----", re.S
)
_SETTING = "GRAPH_NOTIFICATION_CERT"


@dataclass(frozen=True)
class _Pair:
    thumbprint: str  # SHA-1 of the DER certificate, upper-case hex (as Graph sends it)
    certificate_der: bytes
    private_key: RSAPrivateKey


class NotificationDecryptor:
    """Decrypts ``encryptedContent`` with the connector's notification certificate(s)."""

    def __init__(self, pem_bundle: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        keys: list[rsa.RSAPrivateKey] = []
        for block in _KEY_BLOCK.findall(pem_bundle):
            try:
                key = load_pem_private_key(block.encode(), password=None)
            except (ValueError, TypeError):
                raise SettingsError(_SETTING, "a PEM private key block is not valid") from None
            if not isinstance(key, rsa.RSAPrivateKey):
                raise SettingsError(_SETTING, "the private key must be RSA")
            keys.append(key)
        pairs: list[_Pair] = []
        for block in _CERT_BLOCK.findall(pem_bundle):
            try:
                cert = x509.load_pem_x509_certificate(block.encode())
            except ValueError:
                raise SettingsError(_SETTING, "a PEM certificate block is not valid") from None
            public = cert.public_key()
            if not isinstance(public, rsa.RSAPublicKey):
                raise SettingsError(_SETTING, "the certificate must hold an RSA key")
            match = next(
                (k for k in keys if k.public_key().public_numbers() == public.public_numbers()),
                None,
            )
            if match is None:
                raise SettingsError(_SETTING, "a certificate has no matching private key")
            pairs.append(
                _Pair(
                    thumbprint=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303
                    certificate_der=cert.public_bytes(serialization.Encoding.DER),
                    private_key=match,
                )
            )
        if not pairs:
            raise SettingsError(_SETTING, "holds no PEM certificate with its private key")
        self._pairs = pairs
        self._by_thumbprint = {p.thumbprint: p for p in pairs}

    @property
    def thumbprints(self) -> tuple[str, ...]:
        return tuple(p.thumbprint for p in self._pairs)

    def encryption_certificate(self) -> str:
        """The active certificate as Graph wants it in ``encryptionCertificate`` (base64 DER)."""
        return base64.b64encode(self._pairs[0].certificate_der).decode("ascii")

    def _pair_for(self, thumbprint: Any) -> _Pair:
        if thumbprint in (None, ""):
            return self._pairs[0]
        pair = self._by_thumbprint.get(str(thumbprint).replace(":", "").upper())
        if pair is None:
            raise AuthenticationError(
                "The notification is encrypted for a certificate this deployment does not hold."
            )
        return pair

    def decrypt(self, encrypted_content: Mapping[str, Any]) -> dict[str, Any]:
        """The resource JSON. ``AuthenticationError`` when the key or signature does not verify,
        ``InvalidInputError`` when the content is malformed."""
        from cryptography.hazmat.primitives import hashes, padding
        from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if not isinstance(encrypted_content, Mapping):
            raise InvalidInputError("encryptedContent is not an object.")
        pair = self._pair_for(encrypted_content.get("encryptionCertificateThumbprint"))
        try:
            wrapped = base64.b64decode(str(encrypted_content["dataKey"]), validate=True)
            data = base64.b64decode(str(encrypted_content["data"]), validate=True)
            signature = base64.b64decode(str(encrypted_content["dataSignature"]), validate=True)
        except (KeyError, binascii.Error, ValueError):
            raise InvalidInputError(
                "encryptedContent needs base64 data, dataKey and dataSignature."
            ) from None
        oaep = asym_padding.OAEP(
            mgf=asym_padding.MGF1(algorithm=hashes.SHA1()),  # noqa: S303 - Graph's scheme
            algorithm=hashes.SHA1(),  # noqa: S303
            label=None,
        )
        try:
            key = pair.private_key.decrypt(wrapped, oaep)
        except ValueError:
            raise AuthenticationError("The notification's data key does not decrypt.") from None
        if len(key) != 32:
            raise AuthenticationError("The notification's data key has the wrong length.")
        expected = hmac.new(key, data, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise AuthenticationError("The notification's signature does not match its data.")
        if not data or len(data) % 16:
            raise InvalidInputError("The notification's data is not AES-CBC ciphertext.")
        decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        try:
            unpadder = padding.PKCS7(128).unpadder()
            plain = unpadder.update(padded) + unpadder.finalize()
            resource = json.loads(plain.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InvalidInputError("The notification's decrypted data is not JSON.") from None
        if not isinstance(resource, dict):
            raise InvalidInputError("The notification's decrypted data is not a JSON object.")
        return resource
