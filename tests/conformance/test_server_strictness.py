"""The conformance server itself stays strict: what oidc-provider (as configured in
devtools/conformance/server.mjs) refuses, checked without the connector's own code paths, so a
later edit cannot quietly turn it into another lenient stand-in."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from connector_core.crypto import new_pkce_pair
from devtools.conformance import ConformanceServer
from tests.conformance.conftest import SOLO, query_of
from tests.stack import Stack

pytestmark = pytest.mark.slow

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture
def http(cs: ConformanceServer) -> Iterator[httpx.Client]:
    import ssl

    with httpx.Client(
        verify=ssl.create_default_context(cafile=str(cs.tls.ca_bundle)),
        follow_redirects=False,
        timeout=10.0,
        trust_env=False,
    ) as client:
        yield client


def _authorize(cs: ConformanceServer, stack: Stack, **overrides: str | None) -> dict[str, str]:
    _, challenge = new_pkce_pair()
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": cs.client_id,
        "redirect_uri": f"{stack.api}/launch/callback",
        "scope": "launch openid fhirUser",
        "state": "s" * 22,
        "nonce": "n" * 22,
        "aud": cs.fhir_base,
        "launch": cs.make_launch(appointment_id=SOLO, user="clinician"),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def _assertion(stack: Stack, cs: ConformanceServer, **claims: Any) -> str:
    container = stack.container()
    pem = container.settings.smart_private_key.get_secret_value()
    key = load_pem_private_key(pem.encode(), password=None)
    alg = claims.pop("_alg", "RS384")
    now = int(time.time())
    body = {
        "iss": cs.client_id,
        "sub": cs.client_id,
        "aud": f"{cs.issuer}/token",
        "iat": now,
        "exp": now + 240,
        "jti": uuid.uuid4().hex,
        **claims,
    }
    return jwt.encode(
        body,
        key,  # type: ignore[arg-type]
        algorithm=alg,
        headers={"kid": container.signing_keys.active_kid},
    )


def _client_credentials(
    http: httpx.Client, cs: ConformanceServer, assertion: str, scope: str
) -> httpx.Response:
    return http.post(
        f"{cs.issuer}/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
        },
    )


def test_discovery_is_epic_like_and_strict(http: httpx.Client, cs: ConformanceServer) -> None:
    doc = http.get(f"{cs.fhir_base}/.well-known/smart-configuration").json()
    assert doc["issuer"] == cs.issuer != cs.fhir_base
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert doc["token_endpoint_auth_signing_alg_values_supported"] == ["RS384"]
    oidc = http.get(f"{cs.issuer}/.well-known/openid-configuration").json()
    assert oidc["issuer"] == cs.issuer
    assert oidc["token_endpoint"] == doc["token_endpoint"]
    metadata = http.get(f"{cs.fhir_base}/metadata").json()
    assert metadata["resourceType"] == "CapabilityStatement" and metadata["fhirVersion"] == "4.0.1"


@pytest.mark.parametrize(
    ("overrides", "description"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "PKCE"),
        ({"code_challenge_method": "plain"}, "code_challenge_method"),
        ({"aud": "https://fhir.example.org/r4"}, "aud"),
        ({"aud": None}, "aud"),
        ({"launch": None}, "launch"),
        ({"launch": "never-issued"}, "launch"),
    ],
)
def test_authorization_requests_are_refused_with_iss(
    http: httpx.Client,
    cs: ConformanceServer,
    fresh_stack: Stack,
    overrides: dict[str, str | None],
    description: str,
) -> None:
    response = http.get(f"{cs.issuer}/auth", params=_authorize(cs, fresh_stack, **overrides))
    assert response.status_code in (302, 303), response.text[:500]
    answer = query_of(response.headers["location"])
    assert answer["error"] == "invalid_request", answer
    assert answer["iss"] == cs.issuer  # RFC 9207 on error responses too
    assert description.lower() in answer["error_description"].lower(), answer


def test_unregistered_redirect_uri_is_never_redirected_to(
    http: httpx.Client, cs: ConformanceServer, fresh_stack: Stack
) -> None:
    for redirect in (f"{fresh_stack.api}/launch/callback/", f"{fresh_stack.api}/launch/other"):
        response = http.get(
            f"{cs.issuer}/auth", params=_authorize(cs, fresh_stack, redirect_uri=redirect)
        )
        assert response.status_code == 400
        assert 'data-error="invalid_redirect_uri"' in response.text


def test_backend_services_token_needs_a_strict_rs384_assertion(
    http: httpx.Client, cs: ConformanceServer, fresh_stack: Stack
) -> None:
    scope = "system/AuditEvent.write"
    good = _client_credentials(http, cs, _assertion(fresh_stack, cs), scope)
    assert good.status_code == 200, good.text
    assert good.json()["scope"] == scope

    replayed_jti = _assertion(fresh_stack, cs)
    assert _client_credentials(http, cs, replayed_jti, scope).status_code == 200
    refused = {
        "replayed": replayed_jti,
        "rs256": _assertion(fresh_stack, cs, _alg="RS256"),
        "aud-issuer": _assertion(fresh_stack, cs, aud=cs.issuer),
        "sub-other": _assertion(fresh_stack, cs, sub="someone-else"),
        "exp-too-far": _assertion(fresh_stack, cs, exp=int(time.time()) + 3600),
    }
    for case, assertion in refused.items():
        response = _client_credentials(http, cs, assertion, scope)
        assert response.status_code == 401, (case, response.text)
        assert response.json()["error"] == "invalid_client", case

    secret = http.post(
        f"{cs.issuer}/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_id": cs.client_id,
            "client_secret": "x",
        },
    )
    assert secret.status_code in (400, 401) and secret.json()["error"] == "invalid_client"

    user_scope = _client_credentials(http, cs, _assertion(fresh_stack, cs), "user/*.read")
    assert user_scope.status_code == 400 and user_scope.json()["error"] == "invalid_scope"


def test_fhir_api_checks_tokens(
    http: httpx.Client, cs: ConformanceServer, fresh_stack: Stack
) -> None:
    appointment = f"{cs.fhir_base}/Appointment/{SOLO}"
    assert http.get(appointment).status_code == 401
    assert http.get(appointment, headers={"Authorization": "Bearer forged"}).status_code == 401
    backend = _client_credentials(
        http, cs, _assertion(fresh_stack, cs), "system/AuditEvent.write"
    ).json()["access_token"]
    # A backend-services token writes AuditEvents but reads nothing.
    assert http.get(appointment, headers={"Authorization": f"Bearer {backend}"}).status_code == 401
    bad = http.post(
        f"{cs.fhir_base}/AuditEvent",
        headers={"Authorization": f"Bearer {backend}", "Content-Type": "application/fhir+json"},
        json={"resourceType": "AuditEvent"},
    )
    assert bad.status_code == 400
    assert cs.audit_events() == []
