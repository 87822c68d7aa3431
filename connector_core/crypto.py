"""Keys and tokens the connector makes itself: sealing, keyed hashes, PKCE, client assertions.

- ``Keyring`` derives independent subkeys from ``CONNECTOR_SECRET_KEY`` (HKDF-SHA256, one label
  per purpose) for sealing (AES-256-GCM, the purpose bound as associated data) and for keyed
  hashes of identifiers (HMAC-SHA256), so raw EHR ids never leave the request that saw them.
- ``SigningKeys`` holds the RSA key(s) of ``SMART_PRIVATE_KEY`` (one PEM, or several during a
  rollover: the first signs, all are published in the JWKS) and signs RS384 client assertions.

cryptography and PyJWT are imported where used: only some requests need them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from connector_core.errors import AuthenticationError, SettingsError

__all__ = ["Keyring", "SigningKeys", "new_pkce_pair", "random_token"]

_SEAL_VERSION = b"\x01"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def random_token(nbytes: int = 32) -> str:
    """URL-safe random string with ``8 * nbytes`` bits of entropy."""
    return secrets.token_urlsafe(nbytes)


def new_pkce_pair() -> tuple[str, str]:
    """``(code_verifier, S256 code_challenge)`` per RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


class Keyring:
    """Subkeys derived from the deployment's secret key material."""

    def __init__(self, secret_key: bytes) -> None:
        if len(secret_key) < 32:
            raise SettingsError("CONNECTOR_SECRET_KEY", "must hold at least 32 bytes")
        self._root = secret_key
        self._cache: dict[str, bytes] = {}

    def _subkey(self, label: str) -> bytes:
        key = self._cache.get(label)
        if key is None:
            # HKDF (RFC 5869) with SHA-256, empty salt, one 32-byte block.
            prk = hmac.new(b"\x00" * 32, self._root, hashlib.sha256).digest()
            key = hmac.new(prk, label.encode() + b"\x01", hashlib.sha256).digest()
            self._cache[label] = key
        return key

    def keyed_hash(self, purpose: str, *parts: str, length: int = 32) -> str:
        """Hex HMAC-SHA256 of the parts (length-prefixed, so no ambiguity), ``length`` chars."""
        mac = hmac.new(self._subkey(f"hash:{purpose}"), digestmod=hashlib.sha256)
        for part in parts:
            data = part.encode()
            mac.update(struct.pack(">I", len(data)) + data)
        return mac.hexdigest()[:length]

    def seal(self, purpose: str, payload: dict[str, Any], *, ttl_seconds: int | None = None) -> str:
        """Encrypt and authenticate ``payload``; only ``unseal`` with the same purpose opens it."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = dict(payload)
        if ttl_seconds is not None:
            body["_exp"] = int(time.time()) + ttl_seconds
        nonce = secrets.token_bytes(12)
        plaintext = json.dumps(body, separators=(",", ":")).encode()
        ciphertext = AESGCM(self._subkey(f"seal:{purpose}")).encrypt(
            nonce, plaintext, purpose.encode()
        )
        return _b64url(_SEAL_VERSION + nonce + ciphertext)

    def unseal(self, purpose: str, token: str, *, now: float | None = None) -> dict[str, Any]:
        """``AuthenticationError`` if forged, altered, of another purpose or expired."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            raw = _b64url_decode(token)
        except (ValueError, TypeError):
            raise AuthenticationError("The sealed value is malformed.") from None
        if len(raw) < 1 + 12 + 16 or raw[:1] != _SEAL_VERSION:
            raise AuthenticationError("The sealed value is malformed.")
        try:
            plaintext = AESGCM(self._subkey(f"seal:{purpose}")).decrypt(
                raw[1:13], raw[13:], purpose.encode()
            )
        except InvalidTag:
            raise AuthenticationError("The sealed value is not genuine.") from None
        body: dict[str, Any] = json.loads(plaintext)
        expires = body.pop("_exp", None)
        if expires is not None and (now if now is not None else time.time()) > expires:
            raise AuthenticationError("The sealed value has expired.")
        return body


_PEM_BLOCK = re.compile(
    r"-----BEGIN (?:RSA )?PRIVATE KEY-----.+?-----END (?:RSA )?PRIVATE KEY-----", re.S
)


@dataclass(frozen=True)
class _Key:
    kid: str
    private_key: Any  # cryptography RSAPrivateKey
    public_jwk: dict[str, str]


class SigningKeys:
    """The connector's RSA signing key(s); the first is active, all are published."""

    def __init__(self, keys: list[_Key]) -> None:
        if not keys:
            raise SettingsError("SMART_PRIVATE_KEY", "holds no PEM private key")
        self._keys = keys

    @classmethod
    def from_pem_bundle(cls, pem_bundle: str) -> SigningKeys:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        keys: list[_Key] = []
        for block in _PEM_BLOCK.findall(pem_bundle):
            try:
                key = load_pem_private_key(block.encode(), password=None)
            except (ValueError, TypeError):
                raise SettingsError("SMART_PRIVATE_KEY", "a PEM block is not a valid key") from None
            if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
                raise SettingsError("SMART_PRIVATE_KEY", "keys must be RSA, 2048 bits or more")
            numbers = key.public_key().public_numbers()
            n = _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            e = _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
            # RFC 7638 thumbprint as kid: stable across restarts and deployments.
            canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"))
            kid = _b64url(hashlib.sha256(canonical.encode()).digest())
            jwk = {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS384", "n": n, "e": e}
            keys.append(_Key(kid=kid, private_key=key, public_jwk=jwk))
        return cls(keys)

    @property
    def active_kid(self) -> str:
        return self._keys[0].kid

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [dict(k.public_jwk) for k in self._keys]}

    def client_assertion(
        self, *, client_id: str, audience: str, lifetime_seconds: int = 240
    ) -> str:
        """RS384 JWT for ``private_key_jwt`` (SMART): iss = sub = client id, aud = token URL."""
        import jwt

        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "iat": now,
            "exp": now + min(lifetime_seconds, 300),
            "jti": uuid.uuid4().hex,
        }
        active = self._keys[0]
        return jwt.encode(
            claims, active.private_key, algorithm="RS384", headers={"kid": active.kid, "typ": "JWT"}
        )
