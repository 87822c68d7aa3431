"""Fixtures: a fresh sandbox EHR per test over real HTTP, and a client JWKS server.

The helpers take the ``SandboxEhr`` (its default profile) or any ``EhrProfile``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from devtools._serve import ServerThread
from devtools.sandbox.ehr import EhrProfile, SandboxEhr

CONNECTOR_URL = "http://connector.test"
CLIENT_ID = "connector-client-3f1b"
LAUNCH_CALLBACK = f"{CONNECTOR_URL}/api/launch/callback"
SIGNIN_CALLBACK = f"{CONNECTOR_URL}/api/ehr-signin/callback"

Ehr = SandboxEhr | EhrProfile


@dataclass
class ClientKeys:
    rsa_key: rsa.RSAPrivateKey
    rsa_kid: str
    ec_key: ec.EllipticCurvePrivateKey
    ec_kid: str
    jwks_url: str

    def assertion(
        self,
        audience: str,
        *,
        alg: str = "RS384",
        exp_in: float = 240,
        jti: str | None = None,
        iss: str = CLIENT_ID,
        key: Any = None,
        kid: str | None = None,
    ) -> str:
        now = time.time()
        claims = {
            "iss": iss,
            "sub": iss,
            "aud": audience,
            "exp": int(now + exp_in),
            "iat": int(now),
            "jti": jti or uuid.uuid4().hex,
        }
        if key is None:
            key = self.rsa_key if alg.startswith("RS") else self.ec_key
        if kid is None:
            kid = self.rsa_kid if alg.startswith("RS") else self.ec_kid
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="session")
def client_keys() -> Iterator[ClientKeys]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    rsa_jwk.update(kid="client-rsa-1", alg="RS384", use="sig")
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    ec_jwk.update(kid="client-ec-1", alg="ES384", use="sig")
    jwks = {"keys": [rsa_jwk, ec_jwk]}

    async def serve_jwks(request: Request) -> JSONResponse:
        return JSONResponse(jwks)

    app = Starlette(routes=[Route("/.well-known/jwks.json", serve_jwks)])
    with ServerThread(app, port=0, name="client-jwks") as server:
        yield ClientKeys(
            rsa_key, "client-rsa-1", ec_key, "client-ec-1", f"{server.url}/.well-known/jwks.json"
        )


@pytest.fixture(scope="module")
def _served_ehr(client_keys: ClientKeys) -> Iterator[SandboxEhr]:
    instance = SandboxEhr(
        connector_url=CONNECTOR_URL,
        smart_client_id=CLIENT_ID,
        connector_jwks_url=client_keys.jwks_url,
    )
    server = ServerThread(instance.app, port=0, name="sandbox-ehr")
    instance.set_base_url(server.url)
    with server:
        yield instance


@pytest.fixture
def ehr(_served_ehr: SandboxEhr) -> Iterator[SandboxEhr]:
    """The module's EHR server, with faults, flags and inspection lists reset per test."""
    _served_ehr.reset()
    _served_ehr.default_config_id = None
    yield _served_ehr
    _served_ehr.reset()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, timeout=10.0) as client:
        yield client


# --- helpers ---------------------------------------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def authorize_params(
    ehr: Ehr,
    challenge: str,
    *,
    launch: str | None = None,
    scope: str | None = None,
    redirect_uri: str = LAUNCH_CALLBACK,
    **extra: str,
) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": redirect_uri,
        "scope": scope or ("launch openid fhirUser user/*.rs" if launch else "openid fhirUser"),
        "state": secrets.token_urlsafe(16),
        "aud": ehr.fhir_base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "nonce": "n-" + secrets.token_hex(4),
    }
    if launch:
        params["launch"] = launch
    params.update(extra)
    return params


def authorize_code(http: httpx.Client, ehr: Ehr, params: dict[str, str]) -> str:
    response = http.get(ehr.authorization_endpoint, params=params)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(params["redirect_uri"] + "?")
    query = query_of(location)
    assert query["state"] == params["state"]
    assert "error" not in query, query
    assert query["iss"] == ehr.issuer  # RFC 9207
    return query["code"]


def exchange(
    http: httpx.Client,
    ehr: Ehr,
    code: str,
    verifier: str,
    *,
    keys: ClientKeys | None = None,
    redirect_uri: str = LAUNCH_CALLBACK,
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    if keys is not None:
        form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        form["client_assertion"] = keys.assertion(ehr.token_endpoint)
    else:
        form["client_id"] = CLIENT_ID
    return http.post(ehr.token_endpoint, data=form)


def backend_token(
    http: httpx.Client,
    ehr: Ehr,
    keys: ClientKeys,
    *,
    scope: str = "system/AuditEvent.c",
    assertion: str | None = None,
) -> httpx.Response:
    return http.post(
        ehr.token_endpoint,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion or keys.assertion(ehr.token_endpoint),
        },
    )


def verify_id_token(http: httpx.Client, ehr: Ehr, id_token: str) -> dict[str, Any]:
    """Verifies as a strict relying party does: the issuer from smart-configuration, its keys
    from OpenID discovery at that issuer, ``iss``/``aud``/``exp``/``iat`` required."""
    smart = http.get(f"{ehr.fhir_base}/.well-known/smart-configuration").json()
    issuer = smart["issuer"]
    assert issuer != ehr.fhir_base
    config = http.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration").json()
    assert config["issuer"] == issuer
    jwks = http.get(config["jwks_uri"]).json()
    kid = jwt.get_unverified_header(id_token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(
        id_token,
        jwt.PyJWK(jwk).key,
        algorithms=["RS256"],
        audience=CLIENT_ID,
        issuer=issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat"]},
    )
    return claims
