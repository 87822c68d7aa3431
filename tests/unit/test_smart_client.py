"""SmartClient over httpx.MockTransport: discovery cache, authorize URL, code exchange, id_token."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from connector_core.adapters.smart import SmartClient, SmartConfiguration, normalize_fhir_base
from connector_core.errors import EhrError
from tests.helpers import in_memory_container

BASE = "https://ehr.example/fhir/r4"
TOKEN_URL = "https://ehr.example/oauth2/token"
JWKS_URL = "https://ehr.example/jwks"
CLIENT = "vv-client"
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


def _smart_doc(**overrides: Any) -> dict[str, Any]:
    doc = {
        "issuer": BASE,
        "jwks_uri": JWKS_URL,
        "authorization_endpoint": "https://ehr.example/oauth2/authorize?tenant=a",
        "token_endpoint": TOKEN_URL,
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384"],
        "capabilities": ["launch-ehr"],
        "grant_types_supported": ["authorization_code", "client_credentials"],
    }
    doc.update(overrides)
    return doc


class FakeEhr:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.smart_doc = _smart_doc()
        self.jwks: dict[str, Any] = {"keys": [_jwk(_KEY, "k1")]}
        self.token_status = 200
        self.token_body: dict[str, Any] = {"access_token": "at", "token_type": "Bearer"}
        self.discovery_status = 200

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path.endswith("/.well-known/smart-configuration"):
            if self.discovery_status != 200:
                return httpx.Response(self.discovery_status, text="down")
            return httpx.Response(200, json=self.smart_doc)
        if path == "/jwks":
            return httpx.Response(200, json=self.jwks)
        if path == "/oauth2/token":
            return httpx.Response(self.token_status, json=self.token_body)
        if path.startswith("/fhir/r4/Appointment/"):
            return httpx.Response(200, json={"resourceType": "Appointment", "id": "a1"})
        return httpx.Response(404)

    def count(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.url.path.endswith(suffix))


@pytest.fixture
def ehr() -> FakeEhr:
    return FakeEhr()


@pytest.fixture
def client(ehr: FakeEhr) -> SmartClient:
    container = in_memory_container()
    http = httpx.Client(transport=httpx.MockTransport(ehr.handler))
    return SmartClient(http=http, signing_keys=container.signing_keys)


def _id_token(key: rsa.RSAPrivateKey = _KEY, kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": BASE, "aud": CLIENT, "sub": "u1", "exp": now + 300, "iat": now}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_discovery_is_cached_per_issuer(client: SmartClient, ehr: FakeEhr) -> None:
    first = client.get_configuration(BASE + "/")
    second = client.get_configuration(BASE)
    assert first is second
    assert ehr.count("smart-configuration") == 1
    assert first.supports_private_key_jwt() and first.supports_s256()


def test_discovery_expires_after_ttl(ehr: FakeEhr) -> None:
    now = [0.0]
    container = in_memory_container()
    client = SmartClient(
        http=httpx.Client(transport=httpx.MockTransport(ehr.handler)),
        signing_keys=container.signing_keys,
        discovery_ttl_seconds=10,
        clock=lambda: now[0],
    )
    client.get_configuration(BASE)
    now[0] = 11
    client.get_configuration(BASE)
    assert ehr.count("smart-configuration") == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"discovery_status": 500}, "answered 500"),
        ({"smart_doc": _smart_doc(token_endpoint="not a url")}, "token endpoint"),
        (
            {"smart_doc": _smart_doc(authorization_endpoint="https://x/\r\nSet-Cookie: a")},
            "authorization",
        ),
    ],
)
def test_discovery_failures_are_ehr_errors(
    client: SmartClient, ehr: FakeEhr, change: dict[str, Any], message: str
) -> None:
    for name, value in change.items():
        setattr(ehr, name, value)
    with pytest.raises(EhrError, match=message):
        client.get_configuration(BASE)


def test_authorize_url_carries_pkce_aud_launch_and_keeps_endpoint_query(
    client: SmartClient,
) -> None:
    smart = client.get_configuration(BASE)
    url = client.build_authorize_url(
        smart,
        client_id=CLIENT,
        redirect_uri="https://c.example/api/launch/callback",
        scope="launch openid fhirUser",
        state="st",
        code_challenge="ch",
        aud=BASE,
        launch="L1",
        nonce="n1",
    )
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert url.startswith("https://ehr.example/oauth2/authorize?tenant=a&")
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256"
    assert query["aud"] == BASE
    assert query["launch"] == "L1"
    assert query["scope"] == "launch openid fhirUser"
    assert query["nonce"] == "n1"


def test_code_exchange_uses_private_key_jwt_rs384(client: SmartClient, ehr: FakeEhr) -> None:
    ehr.token_body = {
        "access_token": "at",
        "token_type": "Bearer",
        "patient": "p1",
        "encounter": "e1",
        "fhirContext": [{"reference": "Appointment/a1"}, "junk"],
        "need_patient_banner": False,
        "smart_style_url": "https://x/style",
    }
    smart = client.get_configuration(BASE)
    tokens = client.exchange_code(
        smart, client_id=CLIENT, code="c1", redirect_uri="https://r", code_verifier="v" * 43
    )
    assert tokens.patient == "p1" and tokens.encounter == "e1"
    assert tokens.fhir_context == [{"reference": "Appointment/a1"}]
    assert tokens.extra == {"smart_style_url": "https://x/style"}
    form = {k: v[0] for k, v in parse_qs(ehr.requests[-1].content.decode()).items()}
    assert form["grant_type"] == "authorization_code"
    assert form["code_verifier"] == "v" * 43
    assert "client_id" not in form
    header = jwt.get_unverified_header(form["client_assertion"])
    assert header["alg"] == "RS384"
    claims = jwt.decode(form["client_assertion"], options={"verify_signature": False})
    assert claims["iss"] == claims["sub"] == CLIENT
    assert claims["aud"] == TOKEN_URL
    assert claims["exp"] - claims["iat"] <= 300


def test_code_exchange_public_client_when_ehr_has_no_private_key_jwt(
    client: SmartClient, ehr: FakeEhr
) -> None:
    ehr.smart_doc = _smart_doc(token_endpoint_auth_methods_supported=["none"])
    smart = client.get_configuration(BASE)
    client.exchange_code(smart, client_id=CLIENT, code="c", redirect_uri="r", code_verifier="v")
    form = parse_qs(ehr.requests[-1].content.decode())
    assert form["client_id"] == [CLIENT]
    assert "client_assertion" not in form


def test_code_exchange_refusal_names_the_oauth_error_only(
    client: SmartClient, ehr: FakeEhr
) -> None:
    ehr.token_status = 400
    ehr.token_body = {"error": "invalid_grant", "error_description": "PKCE failed for Patient X"}
    smart = client.get_configuration(BASE)
    with pytest.raises(EhrError) as caught:
        client.exchange_code(smart, client_id=CLIENT, code="c", redirect_uri="r", code_verifier="v")
    assert "invalid_grant" in caught.value.detail
    assert "Patient X" not in caught.value.detail
    assert caught.value.extra["oauthError"] == "invalid_grant"


def test_id_token_verified_against_jwks_which_is_cached(client: SmartClient, ehr: FakeEhr) -> None:
    smart = client.get_configuration(BASE)
    claims = client.validate_id_token(
        smart, _id_token(fhirUser=f"{BASE}/Practitioner/p1", nonce="n"), client_id=CLIENT, nonce="n"
    )
    client.validate_id_token(smart, _id_token(), client_id=CLIENT)
    assert claims["fhirUser"] == f"{BASE}/Practitioner/p1"
    assert ehr.count("/jwks") == 1


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: _id_token(aud="someone-else"), "another client"),
        (lambda: _id_token(iss="https://evil.example/fhir"), "another issuer"),
        (lambda: _id_token(exp=int(time.time()) - 3600), "expired"),
        (lambda: _id_token(key=_OTHER_KEY), "failed verification"),
        (lambda: _id_token(nonce="other"), "nonce"),
        (lambda: "not-a-jwt", "not a valid JWT"),
    ],
)
def test_bad_id_tokens_are_refused(client: SmartClient, token: Any, message: str) -> None:
    smart = client.get_configuration(BASE)
    with pytest.raises(EhrError, match=message):
        client.validate_id_token(smart, token(), client_id=CLIENT, nonce="n")


def test_unknown_kid_refetches_jwks_once(client: SmartClient, ehr: FakeEhr) -> None:
    smart = client.get_configuration(BASE)
    client.validate_id_token(smart, _id_token(), client_id=CLIENT)
    ehr.jwks = {"keys": [_jwk(_KEY, "k1"), _jwk(_OTHER_KEY, "k2")]}
    client.validate_id_token(smart, _id_token(key=_OTHER_KEY, kid="k2"), client_id=CLIENT)
    assert ehr.count("/jwks") == 2


def test_id_token_without_jwks_is_decoded_but_audience_checked(
    client: SmartClient, ehr: FakeEhr
) -> None:
    ehr.smart_doc = _smart_doc(jwks_uri=None)
    smart = client.get_configuration(BASE)
    assert smart.jwks_uri is None
    unsigned = _id_token(key=_OTHER_KEY, fhirUser="Practitioner/p1")
    assert client.validate_id_token(smart, unsigned, client_id=CLIENT)["fhirUser"] == (
        "Practitioner/p1"
    )
    with pytest.raises(EhrError, match="another client"):
        client.validate_id_token(smart, _id_token(aud="x"), client_id=CLIENT)


def test_backend_token_is_cached_until_expiry(client: SmartClient, ehr: FakeEhr) -> None:
    ehr.token_body = {"access_token": "sys", "token_type": "Bearer", "expires_in": 300}
    smart = client.get_configuration(BASE)
    assert client.backend_token(smart, client_id=CLIENT, scope="system/AuditEvent.write") == "sys"
    assert client.backend_token(smart, client_id=CLIENT, scope="system/AuditEvent.write") == "sys"
    assert ehr.count("/oauth2/token") == 1
    form = parse_qs(ehr.requests[-1].content.decode())
    assert form["grant_type"] == ["client_credentials"]


def test_read_resource_sends_the_bearer_token(client: SmartClient, ehr: FakeEhr) -> None:
    resource = client.read_resource(BASE, "Appointment/a1", access_token="at")
    assert resource["resourceType"] == "Appointment"
    assert ehr.requests[-1].headers["authorization"] == "Bearer at"
    with pytest.raises(EhrError):
        client.read_resource(BASE, "Encounter/x", access_token="at")


def test_normalize_fhir_base() -> None:
    assert normalize_fhir_base("HTTPS://EHR.example/fhir/R4/") == "https://ehr.example/fhir/R4"


def test_private_key_jwt_needs_rs384_when_algs_listed() -> None:
    doc = _smart_doc(token_endpoint_auth_signing_alg_values_supported=["ES384"])
    assert not SmartConfiguration.from_document(BASE, doc).supports_private_key_jwt()
