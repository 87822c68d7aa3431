"""Small JOSE helpers shared by the Entra and Graph stand-ins (signing keys, JWKS, raw JWTs)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["SigningKey", "b64url", "b64url_decode", "hs256_jwt", "unsigned_jwt", "utc_now"]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class SigningKey:
    """An RSA signing key with a self-signed certificate, published like Entra's keys."""

    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    kid: str
    created: dt.datetime = field(default_factory=utc_now)

    @classmethod
    def generate(cls, subject: str = "sandbox.login.local") -> SigningKey:
        from devtools.dev_secrets import new_self_signed_cert

        key, cert = new_self_signed_cert(subject)
        # Entra's kid is the base64url SHA-1 thumbprint of the certificate (same as x5t).
        kid = b64url(cert.fingerprint(hashes.SHA1()))
        return cls(private_key=key, certificate=cert, kid=kid)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    @property
    def x5t(self) -> str:
        return self.kid

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def jwk(self, *, issuer: str | None = None) -> dict[str, Any]:
        numbers = self.public_key.public_numbers()
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        jwk: dict[str, Any] = {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.x5t,
            "n": _int_b64(numbers.n),
            "e": _int_b64(numbers.e),
            "x5c": [base64.b64encode(der).decode("ascii")],
        }
        if issuer is not None:
            jwk["issuer"] = issuer
        return jwk


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    def enc(obj: dict[str, Any]) -> str:
        return b64url(json.dumps(obj, separators=(",", ":")).encode())

    return f"{enc(header)}.{enc(claims)}"


def unsigned_jwt(claims: dict[str, Any], *, kid: str | None = None) -> str:
    """``alg: none`` token (a forgery: must always be refused)."""
    header: dict[str, Any] = {"typ": "JWT", "alg": "none"}
    if kid:
        header["kid"] = kid
    return _segments(header, claims) + "."


def hs256_jwt(claims: dict[str, Any], secret: bytes, *, kid: str | None = None) -> str:
    """HS256 token with an arbitrary secret (e.g. the RSA public key: algorithm confusion)."""
    header: dict[str, Any] = {"typ": "JWT", "alg": "HS256"}
    if kid:
        header["kid"] = kid
    signing_input = _segments(header, claims)
    sig = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def new_guid() -> str:
    return str(uuid.uuid4())
