"""Keys and tokens the connector makes itself: sealing, keyed hashes, PKCE, client assertions.

- ``Keyring`` holds the keys of ``CONNECTOR_SECRET_KEY`` (several during a rotation, newest
  first) and derives subkeys from them (HKDF-SHA256, one label per purpose):

  * sealing (AES-256-GCM). The first key seals; every listed key opens what it sealed. A sealed
    value names its key: ``base64url(0x02 | key id (4 bytes) | nonce (12) | ciphertext+tag)``,
    with the version byte, key id and purpose bound as associated data. The key id is the first
    4 bytes of ``HKDF(key, "key-id")``, shown as 8 hex digits (``Keyring.key_ids``); it says
    nothing about the key. Values sealed before key ids existed (version ``0x01``, no key id)
    still open: every listed key is tried.
  * keyed hashes of identifiers (HMAC-SHA256: visit key = Graph ``externalId``, EHR user key,
    participant keys). They are keyed by the deployment's *identifier key*, which does not
    rotate with the sealing keys, so identifiers stay the same across a rotation. The identifier
    key is stored wrapped (sealed) under the listed keys (``connector_core.identifier_key``);
    without a store (tests, tools) it is the oldest (last) listed key: with a single key, the
    key that has always keyed them.

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
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector_core.errors import AuthenticationError, SettingsError, UnknownKeyError

__all__ = [
    "MAX_SECRET_KEYS",
    "Keyring",
    "SigningKeys",
    "key_id",
    "new_pkce_pair",
    "random_token",
    "sealed_key_id",
]

_SEAL_V1 = 0x01  # legacy: version | nonce | ciphertext; associated data = purpose
_SEAL_V2 = 0x02  # version | key id | nonce | ciphertext; associated data = header + purpose
_KEY_ID_BYTES = 4
_NONCE_BYTES = 12
_TAG_BYTES = 16
# Bounds the work of opening a legacy value (each listed key is tried) and keeps lists sane.
MAX_SECRET_KEYS = 8
_SETTING = "CONNECTOR_SECRET_KEY"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hkdf(root: bytes, label: str) -> bytes:
    """HKDF (RFC 5869) with SHA-256, empty salt, one 32-byte block of output."""
    prk = hmac.new(b"\x00" * 32, root, hashlib.sha256).digest()
    return hmac.new(prk, label.encode() + b"\x01", hashlib.sha256).digest()


def key_id(material: bytes) -> str:
    """The public id of a ``CONNECTOR_SECRET_KEY`` key: 8 hex digits, derived one way."""
    return _hkdf(material, "key-id")[:_KEY_ID_BYTES].hex()


def sealed_key_id(token: str) -> str | None:
    """The key id a sealed value names (``None`` for a legacy value without one).

    ``ValueError`` when ``token`` is not a sealed value at all. Reads only the header."""
    try:
        raw = _b64url_decode(token)
    except (ValueError, TypeError):
        raise ValueError("not a sealed value") from None
    if len(raw) >= 1 + _NONCE_BYTES + _TAG_BYTES and raw[0] == _SEAL_V1:
        return None
    if len(raw) >= 1 + _KEY_ID_BYTES + _NONCE_BYTES + _TAG_BYTES and raw[0] == _SEAL_V2:
        return raw[1 : 1 + _KEY_ID_BYTES].hex()
    raise ValueError("not a sealed value")


def random_token(nbytes: int = 32) -> str:
    """URL-safe random string with ``8 * nbytes`` bits of entropy."""
    return secrets.token_urlsafe(nbytes)


def new_pkce_pair() -> tuple[str, str]:
    """``(code_verifier, S256 code_challenge)`` per RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


@dataclass
class _SealKey:
    """One listed key: its id and the subkeys derived from it (cached per purpose)."""

    material: bytes
    kid: bytes
    subkeys: dict[str, bytes] = field(default_factory=dict)

    def subkey(self, label: str) -> bytes:
        key = self.subkeys.get(label)
        if key is None:
            key = self.subkeys[label] = _hkdf(self.material, label)
        return key


IdentifierRootLoader = Callable[["Keyring"], bytes]


class Keyring:
    """The deployment's secret keys: sealing (newest first) and keyed identifier hashes.

    ``secret_keys``: the decoded keys of ``CONNECTOR_SECRET_KEY``, newest first (one ``bytes``
    is a list of one). ``identifier_root``: called once, on the first keyed hash, to get the
    identifier key (``connector_core.identifier_key.IdentifierKeyStore.load``); without it the
    identifier key is the oldest (last) listed key.
    """

    def __init__(
        self,
        secret_keys: bytes | Sequence[bytes],
        *,
        identifier_root: IdentifierRootLoader | None = None,
    ) -> None:
        materials = [secret_keys] if isinstance(secret_keys, bytes) else list(secret_keys)
        if not materials:
            raise SettingsError(_SETTING, "holds no key")
        if len(materials) > MAX_SECRET_KEYS:
            raise SettingsError(_SETTING, f"holds more than {MAX_SECRET_KEYS} keys")
        self._keys: list[_SealKey] = []
        by_id: dict[bytes, _SealKey] = {}
        for position, material in enumerate(materials, start=1):
            if len(material) < 32:
                raise SettingsError(_SETTING, f"key {position} must hold at least 32 bytes")
            kid = bytes.fromhex(key_id(material))
            if kid in by_id:
                raise SettingsError(
                    _SETTING, f"key {position} repeats an earlier key (key id {kid.hex()})"
                )
            key = _SealKey(material=material, kid=kid)
            self._keys.append(key)
            by_id[kid] = key
        self._by_id = by_id
        self._load_identifier_root = identifier_root
        self._identifier_root: bytes | None = None
        self._hash_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # --- key ids ----------------------------------------------------------------------------
    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of the listed keys, newest (sealing) first."""
        return tuple(k.kid.hex() for k in self._keys)

    @property
    def active_key_id(self) -> str:
        return self._keys[0].kid.hex()

    def legacy_identifier_root(self) -> bytes:
        """What keyed identifiers before the identifier key was stored: the single key the
        setting held then, i.e. the oldest (last) listed key.

        A deployment's stored identifier key starts as this, so identifiers made before key
        rotation existed keep their values."""
        return self._keys[-1].material

    # --- keyed hashes -----------------------------------------------------------------------
    def _hash_key(self, purpose: str) -> bytes:
        key = self._hash_keys.get(purpose)
        if key is None:
            key = self._hash_keys[purpose] = _hkdf(self.identifier_root(), f"hash:{purpose}")
        return key

    def identifier_root(self) -> bytes:
        """The identifier key (loaded once; see the class docstring)."""
        root = self._identifier_root
        if root is None:
            with self._lock:
                if self._identifier_root is None:
                    loader = self._load_identifier_root
                    self._identifier_root = (
                        loader(self) if loader is not None else self.legacy_identifier_root()
                    )
                root = self._identifier_root
        return root

    def keyed_hash(self, purpose: str, *parts: str, length: int = 32) -> str:
        """Hex HMAC-SHA256 of the parts (length-prefixed, so no ambiguity), ``length`` chars."""
        mac = hmac.new(self._hash_key(purpose), digestmod=hashlib.sha256)
        for part in parts:
            data = part.encode()
            mac.update(struct.pack(">I", len(data)) + data)
        return mac.hexdigest()[:length]

    # --- sealing ----------------------------------------------------------------------------
    def seal(
        self,
        purpose: str,
        payload: dict[str, Any],
        *,
        ttl_seconds: int | None = None,
        with_key: str | None = None,
    ) -> str:
        """Encrypt and authenticate ``payload`` under the first key (or the listed key whose id
        is ``with_key``); only ``unseal`` with the same purpose opens it, on an instance that
        lists that key."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = dict(payload)
        if ttl_seconds is not None:
            body["_exp"] = int(time.time()) + ttl_seconds
        key = self._keys[0] if with_key is None else self._by_id[bytes.fromhex(with_key)]
        header = bytes([_SEAL_V2]) + key.kid
        nonce = secrets.token_bytes(_NONCE_BYTES)
        plaintext = json.dumps(body, separators=(",", ":")).encode()
        ciphertext = AESGCM(key.subkey(f"seal:{purpose}")).encrypt(
            nonce, plaintext, header + purpose.encode()
        )
        return _b64url(header + nonce + ciphertext)

    def unseal(self, purpose: str, token: str, *, now: float | None = None) -> dict[str, Any]:
        """``AuthenticationError`` if forged, altered, of another purpose or expired;
        ``UnknownKeyError`` (one of those) if sealed with a key this keyring does not list."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            raw = _b64url_decode(token)
        except (ValueError, TypeError):
            raise AuthenticationError("The sealed value is malformed.") from None
        version = raw[0] if raw else None
        plaintext: bytes | None = None
        if version == _SEAL_V2 and len(raw) >= 1 + _KEY_ID_BYTES + _NONCE_BYTES + _TAG_BYTES:
            header, rest = raw[: 1 + _KEY_ID_BYTES], raw[1 + _KEY_ID_BYTES :]
            key = self._by_id.get(header[1:])
            if key is None:
                raise UnknownKeyError(
                    "The sealed value was sealed with a key this instance does not hold "
                    f"(key id {header[1:].hex()}).",
                    keyId=header[1:].hex(),
                )
            try:
                plaintext = AESGCM(key.subkey(f"seal:{purpose}")).decrypt(
                    rest[:_NONCE_BYTES], rest[_NONCE_BYTES:], header + purpose.encode()
                )
            except InvalidTag:
                raise AuthenticationError("The sealed value is not genuine.") from None
        elif version == _SEAL_V1 and len(raw) >= 1 + _NONCE_BYTES + _TAG_BYTES:
            # Sealed before key ids existed: any listed key may have sealed it.
            for key in self._keys:
                try:
                    plaintext = AESGCM(key.subkey(f"seal:{purpose}")).decrypt(
                        raw[1:13], raw[13:], purpose.encode()
                    )
                    break
                except InvalidTag:
                    continue
            if plaintext is None:
                raise AuthenticationError("The sealed value is not genuine.")
        else:
            raise AuthenticationError("The sealed value is malformed.")
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
