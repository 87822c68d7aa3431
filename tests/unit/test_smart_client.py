"""SmartClient over httpx.MockTransport: discovery cache and endpoint checks, authorize URL, code
exchange, id_token (OpenID Connect Core 3.1.3.7), RFC 9207 issuer check, generic failures."""

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

from connector_core.adapters.ehr_http import EhrTargetPolicy
from connector_core.adapters.smart import (
    SmartClient,
    SmartConfiguration,
    normalize_fhir_base,
    verify_response_issuer,
)
from connector_core.errors import AuthenticationError, EhrError, PermissionDeniedError
from tests.helpers import in_memory_container

BASE = "https://ehr.example/fhir/r4"
# Epic-shaped: the authorization server's issuer is not the FHIR base URL.
ISSUER = "https://ehr.example/oauth2"
NONCE = "n"
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
        "issuer": ISSUER,
        "authorization_response_iss_parameter_supported": True,
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
    return SmartClient(
        http=http, signing_keys=container.signing_keys, policy=EhrTargetPolicy(dev_mode=False)
    )


def _id_token(key: rsa.RSAPrivateKey = _KEY, kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": CLIENT, "sub": "u1", "exp": now + 300, "iat": now, "nonce": NONCE}
    body.update(claims)
    for name in [k for k, v in body.items() if v is None]:
        del body[name]  # a None claim is left out
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_discovery_is_cached_per_issuer(client: SmartClient, ehr: FakeEhr) -> None:
    first = client.get_configuration(BASE + "/")
    second = client.get_configuration(BASE)
    assert first is second
    assert ehr.count("smart-configuration") == 1
    assert first.supports_private_key_jwt() and first.supports_s256()
    assert first.issuer == ISSUER
    assert first.authorization_response_iss_parameter_supported is True


def test_discovery_expires_after_ttl(ehr: FakeEhr) -> None:
    now = [0.0]
    container = in_memory_container()
    client = SmartClient(
        http=httpx.Client(transport=httpx.MockTransport(ehr.handler)),
        signing_keys=container.signing_keys,
        policy=EhrTargetPolicy(dev_mode=False),
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
        ({"discovery_status": 500}, "did not provide its SMART configuration"),
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
    ehr.token_body = {"error": "invalid_client", "error_description": "PKCE failed for Patient X"}
    smart = client.get_configuration(BASE)
    with pytest.raises(EhrError) as caught:
        client.exchange_code(smart, client_id=CLIENT, code="c", redirect_uri="r", code_verifier="v")
    assert "invalid_client" in caught.value.detail
    assert "Patient X" not in caught.value.detail
    assert caught.value.extra["oauthError"] == "invalid_client"


def test_a_used_or_expired_code_is_the_answers_fault_not_the_ehrs(
    client: SmartClient, ehr: FakeEhr
) -> None:
    """invalid_grant (a replayed or expired code): 401 for the browser, not a 502."""
    ehr.token_status = 400
    ehr.token_body = {"error": "invalid_grant", "error_description": "PKCE failed for Patient X"}
    smart = client.get_configuration(BASE)
    with pytest.raises(AuthenticationError) as caught:
        client.exchange_code(smart, client_id=CLIENT, code="c", redirect_uri="r", code_verifier="v")
    assert caught.value.http_status == 401 and caught.value.extra["reason"] == "invalid_grant"
    assert "Patient X" not in caught.value.detail


def test_id_token_verified_against_jwks_which_is_cached(client: SmartClient, ehr: FakeEhr) -> None:
    smart = client.get_configuration(BASE)
    claims = client.validate_id_token(
        smart, _id_token(fhirUser=f"{BASE}/Practitioner/p1"), client_id=CLIENT, nonce=NONCE
    )
    client.validate_id_token(smart, _id_token(), client_id=CLIENT, nonce=NONCE)
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
    with pytest.raises(AuthenticationError, match=message):
        client.validate_id_token(smart, token(), client_id=CLIENT, nonce=NONCE)


def test_unknown_kid_refetches_jwks_once(client: SmartClient, ehr: FakeEhr) -> None:
    smart = client.get_configuration(BASE)
    client.validate_id_token(smart, _id_token(), client_id=CLIENT, nonce=NONCE)
    ehr.jwks = {"keys": [_jwk(_KEY, "k1"), _jwk(_OTHER_KEY, "k2")]}
    client.validate_id_token(
        smart, _id_token(key=_OTHER_KEY, kid="k2"), client_id=CLIENT, nonce=NONCE
    )
    assert ehr.count("/jwks") == 2


def test_id_token_without_jwks_is_decoded_but_audience_checked(
    client: SmartClient, ehr: FakeEhr
) -> None:
    ehr.smart_doc = _smart_doc(jwks_uri=None)
    smart = client.get_configuration(BASE)
    assert smart.jwks_uri is None
    unsigned = _id_token(key=_OTHER_KEY, fhirUser="Practitioner/p1")
    claims = client.validate_id_token(smart, unsigned, client_id=CLIENT, nonce=NONCE)
    assert claims["fhirUser"] == "Practitioner/p1"
    with pytest.raises(AuthenticationError, match="another client"):
        client.validate_id_token(smart, _id_token(aud="x"), client_id=CLIENT, nonce=NONCE)


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


# --- discovery endpoints: checked on every use --------------------------------------------------

OTHER_HOST = "auth.vendor-cloud.example.net"


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("authorization_endpoint", f"https://{OTHER_HOST}/authorize"),
        ("token_endpoint", f"https://{OTHER_HOST}/token"),
        ("jwks_uri", f"https://{OTHER_HOST}/jwks"),
    ],
)
def test_endpoint_on_another_host_is_refused_on_every_call(
    client: SmartClient, ehr: FakeEhr, field: str, url: str
) -> None:
    ehr.smart_doc = _smart_doc(**{field: url})
    for _ in range(2):  # the second call answers from the cache and is checked again
        with pytest.raises(PermissionDeniedError) as caught:
            client.get_configuration(BASE)
        assert caught.value.extra["reason"] == "ehr_host_not_approved"
    allowed = client.get_configuration(BASE, allowed_hosts=(OTHER_HOST.upper(),))
    assert getattr(allowed, field) == url
    with pytest.raises(PermissionDeniedError, match="not approved"):
        client.get_configuration(BASE)  # cached, still checked without the allowance
    assert ehr.count("smart-configuration") == 1


def test_endpoint_on_the_same_registrable_domain_is_allowed(
    client: SmartClient, ehr: FakeEhr
) -> None:
    ehr.smart_doc = _smart_doc(token_endpoint="https://oauth.ehr.example/token")
    assert client.get_configuration(BASE).token_endpoint == "https://oauth.ehr.example/token"


def test_http_endpoint_is_refused_outside_dev_mode(client: SmartClient, ehr: FakeEhr) -> None:
    ehr.smart_doc = _smart_doc(token_endpoint="http://ehr.example/oauth2/token")
    with pytest.raises(PermissionDeniedError) as caught:
        client.get_configuration(BASE)
    assert caught.value.extra["reason"] == "ehr_target_refused"


def test_http_fhir_base_is_refused_before_any_request_outside_dev_mode(
    client: SmartClient, ehr: FakeEhr
) -> None:
    with pytest.raises(PermissionDeniedError, match="not an https URL"):
        client.get_configuration("http://ehr.example/fhir/r4")
    with pytest.raises(PermissionDeniedError, match="not an https URL"):
        client.read_resource("http://ehr.example/fhir/r4", "Appointment/a1", access_token="at")
    assert ehr.requests == []


# --- failures: which step, never what the EHR answered ------------------------------------------


def test_failure_messages_do_not_carry_the_ehrs_status(
    client: SmartClient, ehr: FakeEhr, caplog: pytest.LogCaptureFixture
) -> None:
    ehr.discovery_status = 503
    with caplog.at_level("WARNING", logger="connector.ehr"), pytest.raises(EhrError) as discovery:
        client.get_configuration(BASE)
    assert "503" not in discovery.value.detail
    assert discovery.value.extra["ehrStatus"] == 503
    assert any(
        "ehr.call_failed" in r.getMessage() and "status=503" in r.getMessage()
        for r in caplog.records
    )
    ehr.discovery_status = 200
    smart = client.get_configuration(BASE)
    ehr.token_status, ehr.token_body = 418, {"error": "invalid_client"}
    with pytest.raises(EhrError) as token:
        client.exchange_code(smart, client_id=CLIENT, code="c", redirect_uri="r", code_verifier="v")
    assert "418" not in token.value.detail and "invalid_client" in token.value.detail
    assert token.value.extra["ehrStatus"] == 418
    with pytest.raises(EhrError) as read:
        client.read_resource(BASE, "Encounter/x", access_token="at")  # the fake answers 404
    assert "404" not in read.value.detail
    assert read.value.extra["ehrStatus"] == 404


def test_oauth_error_code_is_cleaned_before_it_is_shown(client: SmartClient, ehr: FakeEhr) -> None:
    ehr.token_status, ehr.token_body = 400, {"error": "bad<script>alert(1)</script>"}
    smart = client.get_configuration(BASE)
    with pytest.raises(EhrError) as caught:
        client.exchange_code(smart, client_id=CLIENT, code="c", redirect_uri="r", code_verifier="v")
    assert "<" not in caught.value.detail and ">" not in caught.value.detail


# --- backend tokens ---------------------------------------------------------------------------


def test_forget_backend_token_drops_the_cached_one(client: SmartClient, ehr: FakeEhr) -> None:
    ehr.token_body = {"access_token": "first", "token_type": "Bearer", "expires_in": 300}
    smart = client.get_configuration(BASE)
    scope = "system/AuditEvent.write"
    assert client.backend_token(smart, client_id=CLIENT, scope=scope) == "first"
    ehr.token_body = {"access_token": "second", "token_type": "Bearer", "expires_in": 300}
    assert client.backend_token(smart, client_id=CLIENT, scope=scope) == "first"
    client.forget_backend_token(smart, client_id=CLIENT, scope="another/scope")  # not this one
    assert client.backend_token(smart, client_id=CLIENT, scope=scope) == "first"
    client.forget_backend_token(smart, client_id=CLIENT, scope=scope)
    assert client.backend_token(smart, client_id=CLIENT, scope=scope) == "second"
    assert ehr.count("/oauth2/token") == 2


# --- id_token: OpenID Connect Core 3.1.3.7 ------------------------------------------------------


def _unsigned(alg: str = "none", **claims: Any) -> str:
    """A token with any header: ``alg: none`` or an algorithm the EHR does not use."""
    import base64

    def part(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    body = {"iss": ISSUER, "aud": CLIENT, "sub": "u1", "exp": now + 300, "nonce": NONCE, **claims}
    return part({"alg": alg, "typ": "JWT", "kid": "k1"}) + "." + part(body) + "."


def _without_jwks(client: SmartClient, ehr: FakeEhr) -> SmartConfiguration:
    ehr.smart_doc = _smart_doc(jwks_uri=None)
    smart = client.get_configuration(BASE)
    assert smart.jwks_uri is None
    return smart


@pytest.mark.parametrize("jwks", [True, False], ids=["with-jwks", "without-jwks"])
@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: _id_token(nonce=None), "no nonce"),
        (lambda: _id_token(nonce="someone-elses"), "nonce"),
        (lambda: _id_token(exp=None), "'exp'"),
        (lambda: _id_token(sub=None), "'sub'"),
        (lambda: _id_token(iss=None), "'iss'"),
        (lambda: _id_token(iss=BASE), "another issuer"),  # the FHIR base, not the issuer
        (lambda: _id_token(iss=ISSUER + "/"), "another issuer"),
        (lambda: _id_token(aud="someone-else"), "another client"),
        (lambda: _id_token(exp=int(time.time()) - 3600), "expired"),
        (lambda: _unsigned("none"), "unacceptable signature algorithm"),
        (lambda: _unsigned("HS256"), "unacceptable signature algorithm"),
    ],
    ids=[
        "no-nonce",
        "wrong-nonce",
        "no-exp",
        "no-sub",
        "no-iss",
        "iss-is-fhir-base",
        "iss-trailing-slash",
        "wrong-aud",
        "expired",
        "alg-none",
        "alg-hs256",
    ],
)
def test_id_token_rules(
    client: SmartClient, ehr: FakeEhr, jwks: bool, token: Any, message: str
) -> None:
    smart = client.get_configuration(BASE) if jwks else _without_jwks(client, ehr)
    with pytest.raises(AuthenticationError, match=message):
        client.validate_id_token(smart, token(), client_id=CLIENT, nonce=NONCE)


@pytest.mark.parametrize("jwks", [True, False], ids=["with-jwks", "without-jwks"])
def test_good_id_token_is_accepted(client: SmartClient, ehr: FakeEhr, jwks: bool) -> None:
    smart = client.get_configuration(BASE) if jwks else _without_jwks(client, ehr)
    claims = client.validate_id_token(smart, _id_token(), client_id=CLIENT, nonce=NONCE)
    assert claims["sub"] == "u1" and claims["iss"] == ISSUER


def test_alg_none_is_refused_before_the_jwks_is_fetched(client: SmartClient, ehr: FakeEhr) -> None:
    smart = client.get_configuration(BASE)
    with pytest.raises(AuthenticationError, match="unacceptable"):
        client.validate_id_token(smart, _unsigned("none"), client_id=CLIENT, nonce=NONCE)
    assert ehr.count("/jwks") == 0


def test_discovery_without_issuer_cannot_verify_an_id_token(
    client: SmartClient, ehr: FakeEhr
) -> None:
    doc = _smart_doc()
    del doc["issuer"]
    ehr.smart_doc = doc
    smart = client.get_configuration(BASE)
    assert smart.issuer is None
    with pytest.raises(EhrError, match="names no issuer"):
        client.validate_id_token(smart, _id_token(), client_id=CLIENT, nonce=NONCE)


# --- RFC 9207: the authorization response's iss -------------------------------------------------


def test_response_issuer_exact_match_is_accepted() -> None:
    verify_response_issuer(ISSUER, issuer=ISSUER, required=True)
    verify_response_issuer(ISSUER, issuer=ISSUER, required=False)


@pytest.mark.parametrize(
    ("returned", "issuer", "required", "reason"),
    [
        (BASE, ISSUER, True, "iss_mismatch"),  # the FHIR base instead of the issuer
        (BASE, ISSUER, False, "iss_mismatch"),
        (ISSUER + "/", ISSUER, True, "iss_mismatch"),  # simple string comparison
        (ISSUER.upper(), ISSUER, True, "iss_mismatch"),
        ("https://evil.example/oauth2", ISSUER, False, "iss_mismatch"),
        (None, ISSUER, True, "iss_missing"),
        ("", ISSUER, True, "iss_missing"),
        (ISSUER, None, False, "iss_mismatch"),  # present although no issuer is known
    ],
)
def test_response_issuer_refusals(
    returned: str | None, issuer: str | None, required: bool, reason: str
) -> None:
    with pytest.raises(AuthenticationError) as caught:
        verify_response_issuer(returned, issuer=issuer, required=required)
    assert caught.value.extra["reason"] == reason


def test_response_issuer_may_be_missing_when_the_server_does_not_send_it() -> None:
    verify_response_issuer(None, issuer=ISSUER, required=False)
    verify_response_issuer(None, issuer=None, required=False)
