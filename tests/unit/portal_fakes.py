"""Fakes for the portal unit tests: an Entra-like issuer (own RSA key, OIDC + JWKS over an httpx
MockTransport), a FHIR probe stand-in and a SMART client stand-in with the launch engineer's
interface. Integration tests use the real sandbox instead."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from connector_core.adapters.entra_tokens import PortalTokenValidator
from connector_core.adapters.fhir_probe import ProbeReport, _parse
from connector_core.errors import EhrError, InvalidInputError

AUTHORITY = "https://login.test.example"
CLIENT_ID = "00000000-0000-4000-8000-00000000c0de"  # tests.helpers.make_environ
AUDIENCE = f"api://{CLIENT_ID}"
TENANT_A = "11111111-1111-4111-8111-111111111111"
TENANT_B = "22222222-2222-4222-8222-222222222222"
ADMIN_ROLE = "Connector.Admin"
# The EHR's authorization server issuer (Epic-shaped: not the FHIR base URL). The EHR puts it on
# every authorization response as ``iss`` (RFC 9207).
EHR_AS_ISSUER = "https://fhir.example-health.test/oauth2"
EHR_PRACTITIONER = "https://fhir.example-health.test/api/FHIR/R4/Practitioner/prac-1"


class FakeEntra:
    """Signs tokens like Entra and serves its discovery + JWKS through a MockTransport."""

    def __init__(self, tenants: tuple[str, ...] = (TENANT_A, TENANT_B)) -> None:
        self.tenants = set(tenants)
        self.keys: dict[str, Any] = {}
        self.published: list[str] = []
        self.requests: list[str] = []
        self.kid = self.add_key()

    def add_key(self, *, publish: bool = True) -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = uuid.uuid4().hex[:16]
        self.keys[kid] = key
        if publish:
            self.published.append(kid)
        return kid

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        parts = request.url.path.strip("/").split("/")
        tid = parts[0]
        if tid not in self.tenants:
            return httpx.Response(400, json={"error": "invalid_tenant"})
        if request.url.path.endswith("/.well-known/openid-configuration"):
            return httpx.Response(
                200,
                json={
                    "issuer": f"{AUTHORITY}/{tid}/v2.0",
                    "jwks_uri": f"{AUTHORITY}/{tid}/discovery/v2.0/keys",
                },
            )
        if request.url.path.endswith("/discovery/v2.0/keys"):
            keys = []
            for kid in self.published:
                jwk = json.loads(RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
                jwk.update({"kid": kid, "use": "sig"})
                keys.append(jwk)
            return httpx.Response(200, json={"keys": keys})
        return httpx.Response(404)

    def validator(self, **kwargs: Any) -> PortalTokenValidator:
        return PortalTokenValidator(
            http=httpx.Client(transport=httpx.MockTransport(self.handler)),
            authority_host=AUTHORITY,
            audiences=(AUDIENCE, CLIENT_ID),
            **kwargs,
        )

    def token(
        self,
        *,
        tid: str = TENANT_A,
        upn: str | None = "admin@contoso.example",
        roles: tuple[str, ...] = (ADMIN_ROLE,),
        aud: str = AUDIENCE,
        iss: str | None = None,
        lifetime: int = 3600,
        issued_offset: int = 0,
        kid: str | None = None,
        alg: str = "RS256",
        upn_claim: str = "preferred_username",
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time()) + issued_offset
        claims: dict[str, Any] = {
            "aud": aud,
            "iss": iss or f"{AUTHORITY}/{tid}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "tid": tid,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tid}/{upn}")),
            "ver": "2.0",
        }
        if upn:
            claims[upn_claim] = upn
        if roles:
            claims["roles"] = list(roles)
        claims.update(extra or {})
        kid = kid or self.kid
        if alg == "none":
            header = {"alg": "none", "typ": "JWT", "kid": kid}
            return _b64(header) + "." + _b64(claims) + "."
        if alg.startswith("HS"):
            # The classic confusion attack: HMAC keyed with the published public key.
            import hashlib
            import hmac

            from cryptography.hazmat.primitives import serialization

            secret = (
                self.keys[kid]
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            signing_input = _b64({"alg": alg, "typ": "JWT", "kid": kid}) + "." + _b64(claims)
            mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
            return signing_input + "." + _b64raw(mac)
        return jwt.encode(claims, self.keys[kid], algorithm=alg, headers={"kid": kid})


def _b64raw(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64(obj: dict[str, Any]) -> str:
    return _b64raw(json.dumps(obj, separators=(",", ":")).encode())


class FakeProbe:
    """FhirProbe stand-in: syntax via the real parser; per-URL failures on demand; the EHR's
    endpoints beside the FHIR base by default, or ``endpoints`` (authorize, token, JWKS)."""

    def __init__(self) -> None:
        self.dev_mode = True
        self.failures: dict[str, InvalidInputError] = {}
        self.probed: list[str] = []
        self.endpoints: tuple[str, str, str | None] | None = None

    def check_syntax(self, raw: str) -> str:
        return _parse(raw, allow_http=True).url

    def probe(self, raw: str) -> ProbeReport:
        url = self.check_syntax(raw)
        self.probed.append(url)
        if url in self.failures:
            raise self.failures[url]
        authorize, token, jwks = self.endpoints or (f"{url}/authorize", f"{url}/token", None)
        return ProbeReport(
            fhir_base_url=url,
            fhir_version="4.0.1",
            authorization_endpoint=authorize,
            token_endpoint=token,
            address="127.0.0.1",
            jwks_uri=jwks,
        )


@dataclass
class FakeSmartConfiguration:
    fhir_base_url: str
    authorization_endpoint: str
    issuer: str | None = EHR_AS_ISSUER
    authorization_response_iss_parameter_supported: bool = True


@dataclass
class FakeTokens:
    access_token: str = "at"
    id_token: str | None = "idt"


@dataclass
class FakeSmart:
    """SmartClient stand-in: records calls; codes are valid once if issued by ``issue_code``."""

    codes: dict[str, str] = field(default_factory=dict)  # code -> verifier's challenge
    last_authorize: dict[str, str] = field(default_factory=dict)
    id_token_claims: dict[str, Any] = field(
        default_factory=lambda: {"sub": "u1", "fhirUser": EHR_PRACTITIONER}
    )
    down: bool = False
    issuer: str | None = EHR_AS_ISSUER
    iss_supported: bool = True
    allowed_hosts: list[tuple[str, ...]] = field(default_factory=list)  # one entry per call

    def get_configuration(
        self, fhir_base_url: str, *, allowed_hosts: Iterable[str] = ()
    ) -> FakeSmartConfiguration:
        self.allowed_hosts.append(tuple(allowed_hosts))
        if self.down:
            raise EhrError("The EHR's SMART configuration could not be read; try again later.")
        return FakeSmartConfiguration(
            fhir_base_url, f"{fhir_base_url}/authorize", self.issuer, self.iss_supported
        )

    def build_authorize_url(self, smart: FakeSmartConfiguration, **params: Any) -> str:
        self.last_authorize = {k: str(v) for k, v in params.items() if v is not None}
        return f"{smart.authorization_endpoint}?{urlencode(self.last_authorize)}"

    def issue_code(self) -> str:
        """What the EHR does after the user signs in: a code bound to the PKCE challenge."""
        code = uuid.uuid4().hex
        self.codes[code] = self.last_authorize["code_challenge"]
        return code

    def exchange_code(
        self,
        smart: FakeSmartConfiguration,
        *,
        client_id: str,
        code: str,
        redirect_uri: str,
        code_verifier: str,
    ) -> FakeTokens:
        import base64
        import hashlib

        challenge = self.codes.pop(code, None)
        computed = (
            base64.urlsafe_b64encode(hashlib.sha256(code_verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        if challenge is None or challenge != computed:
            raise EhrError("The EHR refused the sign-in code.")
        return FakeTokens()

    def validate_id_token(
        self,
        smart: FakeSmartConfiguration,
        id_token: str,
        *,
        client_id: str,
        nonce: str,
    ) -> dict[str, Any]:
        if nonce != self.last_authorize.get("nonce"):
            raise EhrError("nonce mismatch")
        return dict(self.id_token_claims)
