"""Discovery and SMART App Launch flows against the sandbox EHR over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr, find_signin_link
from tests.integration.sandbox_ehr.conftest import (
    CLIENT_ID,
    LAUNCH_CALLBACK,
    SIGNIN_CALLBACK,
    ClientKeys,
    authorize_code,
    authorize_params,
    exchange,
    pkce_pair,
    query_of,
    verify_id_token,
)

CLINIC_APPT = seed.APPOINTMENTS["appt-6b1e0d34"]  # has an encounter
PLAIN_APPT = seed.APPOINTMENTS["appt-0c7d5e82"]  # no encounter


def test_discovery_documents(http: httpx.Client, ehr: SandboxEhr) -> None:
    smart = http.get(f"{ehr.fhir_base}/.well-known/smart-configuration")
    assert smart.status_code == 200
    doc = smart.json()
    # as at real EHRs, the authorization server's issuer is not the FHIR base URL
    assert doc["issuer"] == ehr.issuer == f"{ehr.base_url}/oauth2"
    assert doc["issuer"] != ehr.fhir_base
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["authorization_endpoint"] == ehr.authorization_endpoint
    assert doc["token_endpoint"] == ehr.token_endpoint
    assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]
    assert doc["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"authorization_code", "client_credentials"} <= set(doc["grant_types_supported"])
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {
        "launch-ehr",
        "launch-standalone",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "permission-v2",
        "context-ehr-encounter",
    } <= set(doc["capabilities"])
    jwks = http.get(doc["jwks_uri"]).json()
    assert jwks["keys"][0]["kty"] == "RSA" and "d" not in jwks["keys"][0]
    # OpenID discovery at the issuer, and (as Epic does) at the FHIR base: the same issuer
    for url in (
        f"{ehr.issuer}/.well-known/openid-configuration",
        f"{ehr.fhir_base}/.well-known/openid-configuration",
    ):
        oidc = http.get(url).json()
        assert oidc["issuer"] == ehr.issuer
        assert oidc["jwks_uri"] == doc["jwks_uri"]
        assert oidc["authorization_response_iss_parameter_supported"] is True

    metadata = http.get(f"{ehr.fhir_base}/metadata")
    assert metadata.status_code == 200
    assert metadata.headers["content-type"].startswith("application/fhir+json")
    cap = metadata.json()
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"


def test_misconfigured_bases(http: httpx.Client, ehr: SandboxEhr) -> None:
    dstu2 = f"{ehr.base_url}/fhir/dstu2"
    assert http.get(f"{dstu2}/metadata").json()["fhirVersion"] == "1.0.2"
    smart = http.get(f"{dstu2}/.well-known/smart-configuration").json()
    assert smart["code_challenge_methods_supported"] == ["S256"]

    no_pkce = f"{ehr.base_url}/fhir/no-pkce"
    assert http.get(f"{no_pkce}/metadata").json()["fhirVersion"] == "4.0.1"
    smart = http.get(f"{no_pkce}/.well-known/smart-configuration").json()
    assert smart["code_challenge_methods_supported"] == ["plain"]


def test_ehr_launch_clinician_confidential(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    params = authorize_params(ehr, challenge, launch=launch)
    code = authorize_code(http, ehr, params)

    token = exchange(http, ehr, code, verifier, keys=client_keys)
    assert token.status_code == 200, token.text
    assert token.headers["cache-control"] == "no-store"
    body = token.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == params["scope"]
    assert body["patient"] == CLINIC_APPT.patient_id
    assert body["encounter"] == CLINIC_APPT.encounter_id
    assert body["fhirContext"] == [{"reference": f"Appointment/{CLINIC_APPT.id}"}]
    claims = verify_id_token(http, ehr, body["id_token"])
    assert claims["fhirUser"] == f"{ehr.fhir_base}/Practitioner/{CLINIC_APPT.practitioner_id}"
    assert claims["nonce"] == params["nonce"]
    assert claims["sub"] and CLINIC_APPT.practitioner_id not in claims["sub"]
    assert ehr.token_requests[-1] == {"grant_type": "authorization_code", "auth": "private_key_jwt"}

    auth = {"Authorization": f"Bearer {body['access_token']}"}
    appt = http.get(f"{ehr.fhir_base}/Appointment/{CLINIC_APPT.id}", headers=auth)
    assert appt.status_code == 200
    assert appt.headers["content-type"].startswith("application/fhir+json")
    refs = {p["actor"]["reference"] for p in appt.json()["participant"]}
    assert {
        f"Patient/{CLINIC_APPT.patient_id}",
        f"Practitioner/{CLINIC_APPT.practitioner_id}",
    } <= refs
    for path in (
        f"Patient/{CLINIC_APPT.patient_id}",
        f"Practitioner/{CLINIC_APPT.practitioner_id}",
        f"Encounter/{CLINIC_APPT.encounter_id}",
    ):
        assert http.get(f"{ehr.fhir_base}/{path}", headers=auth).json()["id"] == path.split("/")[1]
    assert http.get(f"{ehr.fhir_base}/Patient/pat-unknown", headers=auth).status_code == 404

    unauthenticated = http.get(f"{ehr.fhir_base}/Appointment/{CLINIC_APPT.id}")
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["www-authenticate"].startswith("Bearer")
    bad = http.get(
        f"{ehr.fhir_base}/Appointment/{CLINIC_APPT.id}",
        headers={"Authorization": "Bearer not-a-token"},
    )
    assert bad.status_code == 401


def test_ehr_launch_patient_public_client(http: httpx.Client, ehr: SandboxEhr) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=PLAIN_APPT.id, user="patient")
    params = authorize_params(
        ehr, challenge, launch=launch, scope="launch openid fhirUser patient/*.rs"
    )
    code = authorize_code(http, ehr, params)
    token = exchange(http, ehr, code, verifier)
    assert token.status_code == 200, token.text
    body = token.json()
    claims = verify_id_token(http, ehr, body["id_token"])
    assert claims["fhirUser"] == f"{ehr.fhir_base}/Patient/{PLAIN_APPT.patient_id}"
    assert body["patient"] == PLAIN_APPT.patient_id
    assert "encounter" not in body
    assert ehr.token_requests[-1]["auth"] == "none"

    auth = {"Authorization": f"Bearer {body['access_token']}"}
    own = http.get(f"{ehr.fhir_base}/Patient/{PLAIN_APPT.patient_id}", headers=auth)
    assert own.status_code == 200
    other = http.get(f"{ehr.fhir_base}/Patient/{CLINIC_APPT.patient_id}", headers=auth)
    assert other.status_code == 403  # patient/ scopes stay in the patient's compartment


def test_group_visit_carries_conference_id(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    contexts = []
    for appt_id in seed.GROUP_APPOINTMENT_IDS:
        verifier, challenge = pkce_pair()
        url = ehr.launch_url("cfg-1", appointment_id=appt_id, user="patient")
        assert url.startswith(f"{ehr.connector_url}/api/launch/patient/cfg-1?")
        assert query_of(url)["iss"] == ehr.fhir_base
        params = authorize_params(ehr, challenge, launch=query_of(url)["launch"])
        body = exchange(
            http, ehr, authorize_code(http, ehr, params), verifier, keys=client_keys
        ).json()
        contexts.append(body["fhirContext"])
    for appt_id, ctx in zip(seed.GROUP_APPOINTMENT_IDS, contexts, strict=True):
        assert ctx == [
            {"reference": f"Appointment/{appt_id}"},
            {
                "identifier": {
                    "system": "urn:ehr-virtual-visit:conference-id",
                    "value": seed.CONFERENCE_ID,
                }
            },
        ]


def test_standalone_signin_page(http: httpx.Client, ehr: SandboxEhr) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(ehr, challenge, redirect_uri=SIGNIN_CALLBACK)
    page = http.get(ehr.authorization_endpoint, params=params)
    assert page.status_code == 200
    assert f'data-user-id="{seed.ANALYST_ID}"' in page.text
    link = find_signin_link(page.text, seed.ANALYST_ID)
    redirect = http.get(link)
    assert redirect.status_code == 302
    query = query_of(redirect.headers["location"])
    assert redirect.headers["location"].startswith(SIGNIN_CALLBACK)
    assert query["state"] == params["state"]
    assert query["iss"] == ehr.issuer
    assert http.get(link).status_code == 400  # the sign-in request is single-use

    token = exchange(http, ehr, query["code"], verifier, redirect_uri=SIGNIN_CALLBACK)
    assert token.status_code == 200, token.text
    body = token.json()
    assert "patient" not in body and "fhirContext" not in body
    claims = verify_id_token(http, ehr, body["id_token"])
    assert claims["fhirUser"] == f"{ehr.fhir_base}/Practitioner/{seed.ANALYST_ID}"


def test_access_denied_three_ways(http: httpx.Client, ehr: SandboxEhr) -> None:
    _, challenge = pkce_pair()
    # 1. the Deny link on the sign-in page
    params = authorize_params(ehr, challenge, redirect_uri=SIGNIN_CALLBACK)
    page = http.get(ehr.authorization_endpoint, params=params)
    denied = http.get(find_signin_link(page.text, deny=True))
    assert query_of(denied.headers["location"]) == {
        "error": "access_denied",
        "error_description": "The user denied the request",
        "state": params["state"],
        "iss": ehr.issuer,
    }
    # 2. a launch made with deny=True
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician", deny=True)
    params = authorize_params(ehr, challenge, launch=launch)
    response = http.get(ehr.authorization_endpoint, params=params)
    assert query_of(response.headers["location"])["error"] == "access_denied"
    assert query_of(response.headers["location"])["iss"] == ehr.issuer
    # 3. an injected fault
    ehr.fail_next("authorize")
    params = authorize_params(
        ehr, challenge, launch=ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    )
    response = http.get(ehr.authorization_endpoint, params=params)
    assert response.status_code == 302
    assert query_of(response.headers["location"])["error"] == "access_denied"
    assert query_of(response.headers["location"])["state"] == params["state"]
    assert query_of(response.headers["location"])["iss"] == ehr.issuer
    assert http.get(ehr.authorization_endpoint, params=params).status_code == 302
    assert "code" in query_of(
        http.get(ehr.authorization_endpoint, params=params).headers["location"]
    )


def test_wrong_pkce_verifier(http: httpx.Client, ehr: SandboxEhr) -> None:
    _, challenge = pkce_pair()
    other_verifier, _ = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    response = exchange(http, ehr, code, other_verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_reused_code_is_refused_and_revokes(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    first = exchange(http, ehr, code, verifier, keys=client_keys)
    assert first.status_code == 200
    auth = {"Authorization": f"Bearer {first.json()['access_token']}"}
    assert http.get(f"{ehr.fhir_base}/Appointment/{CLINIC_APPT.id}", headers=auth).is_success
    second = exchange(http, ehr, code, verifier, keys=client_keys)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert (
        http.get(f"{ehr.fhir_base}/Appointment/{CLINIC_APPT.id}", headers=auth).status_code == 401
    )


def test_expired_code(http: httpx.Client, ehr: SandboxEhr) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    real_clock = ehr.clock
    ehr.clock = lambda: real_clock() + 61
    response = exchange(http, ehr, code, verifier)
    assert response.json() == {
        "error": "invalid_grant",
        "error_description": "authorization code expired",
    }


def test_redirect_uri_checks(http: httpx.Client, ehr: SandboxEhr) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    # an unregistered redirect_uri is never redirected to
    params = authorize_params(
        ehr, challenge, launch=launch, redirect_uri="https://evil.example/callback"
    )
    response = http.get(ehr.authorization_endpoint, params=params)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "oauth-error" in response.text
    # nor a prefix-extended one
    params["redirect_uri"] = LAUNCH_CALLBACK + "/x"
    assert http.get(ehr.authorization_endpoint, params=params).status_code == 400
    # an unknown client gets the error page too
    params = authorize_params(ehr, challenge, launch=launch, client_id="someone-else")
    assert http.get(ehr.authorization_endpoint, params=params).status_code == 400
    # the token request must repeat the authorize request's redirect_uri
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    response = exchange(http, ehr, code, verifier, redirect_uri=SIGNIN_CALLBACK)
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"aud": "https://other-ehr.example/fhir/r4"}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "openid fhirUser user/*.rs"}, "invalid_scope"),  # launch without 'launch'
    ],
)
def test_authorize_errors_redirect_with_state(
    http: httpx.Client, ehr: SandboxEhr, override: dict[str, str], error: str
) -> None:
    _, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    params = authorize_params(ehr, challenge, launch=launch)
    params.update(override)
    response = http.get(ehr.authorization_endpoint, params=params)
    assert response.status_code == 302
    assert response.headers["location"].startswith(LAUNCH_CALLBACK + "?")
    query = query_of(response.headers["location"])
    assert query["error"] == error
    assert query["state"] == params["state"]
    assert query["iss"] == ehr.issuer  # RFC 9207: error responses too
    assert "code" not in query


def test_confidential_only_mode(http: httpx.Client, ehr: SandboxEhr) -> None:
    ehr.require_client_assertion = True
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    response = exchange(http, ehr, code, verifier)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert CLIENT_ID  # the public request named the registered client and was still refused
