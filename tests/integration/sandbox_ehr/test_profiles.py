"""The sandbox EHR's profiles (default, epic, oracle) behave like the EHRs they stand for.

What a client can get wrong against real EHRs: the OAuth issuer is not the FHIR base URL; RFC 9207
``iss`` on every authorization response (code and error); id_token ``iss`` = issuer, ``aud``,
``exp``, ``iat``, the request's ``nonce`` and an absolute ``fhirUser``; launch context in the token
response, shaped per EHR; Oracle Health's authorization server on its own host.
"""

from __future__ import annotations

import html
import re
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import jwt
import pytest

from devtools.sandbox import seed
from devtools.sandbox.ehr import (
    ORACLE_TENANT_ID,
    PROFILE_NAMES,
    EhrProfile,
    SandboxEhr,
    find_signin_link,
)
from tests.integration.sandbox_ehr.conftest import (
    CLIENT_ID,
    LAUNCH_CALLBACK,
    SIGNIN_CALLBACK,
    ClientKeys,
    authorize_code,
    authorize_params,
    backend_token,
    exchange,
    pkce_pair,
    query_of,
    verify_id_token,
)

CLINIC_APPT = seed.APPOINTMENTS["appt-6b1e0d34"]  # has an encounter
PLAIN_APPT = seed.APPOINTMENTS["appt-0c7d5e82"]  # no encounter
GROUP_APPT = seed.APPOINTMENTS["appt-d4e8b217"]  # group visit, has an encounter
EPIC_CALL = {
    "ConferenceID": seed.CONFERENCE_ID,
    "ExternalID": "participant-1",
    "ExternalIDType": "External",
    "ConnectionStatus": "Connected",
}
AUDIT_EVENT: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"},
    "action": "E",
    "recorded": "2025-01-01T10:00:00Z",
    "agent": [{"who": {"reference": "Practitioner/prac-7f3a91c2"}, "requestor": True}],
    "source": {"observer": {"display": "EHR virtual-visit connector"}},
    "entity": [{"what": {"reference": "Encounter/enc-4f2c8a19"}}],
}


@pytest.fixture(params=PROFILE_NAMES)
def profile(request: pytest.FixtureRequest, ehr: SandboxEhr) -> EhrProfile:
    return ehr.profile(request.param)


def _launch_tokens(
    http: httpx.Client,
    profile: EhrProfile,
    keys: ClientKeys | None,
    *,
    appointment_id: str = CLINIC_APPT.id,
    user: Literal["clinician", "patient"] = "clinician",
    nonce: str | None = "n-profile-test",
) -> tuple[dict[str, str], dict[str, Any]]:
    verifier, challenge = pkce_pair()
    launch = profile.make_launch(appointment_id=appointment_id, user=user)
    params = authorize_params(profile, challenge, launch=launch)
    if nonce is None:
        del params["nonce"]
    else:
        params["nonce"] = nonce
    code = authorize_code(http, profile, params)
    response = exchange(http, profile, code, verifier, keys=keys)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return params, body


# --- URLs -----------------------------------------------------------------------------------------


def test_profile_urls(ehr: SandboxEhr) -> None:
    base = ehr.base_url
    port = urlsplit(base).port
    default, epic, oracle = (ehr.profile(n) for n in ("default", "epic", "oracle"))
    assert ehr.profiles == (default, epic, oracle)
    assert ehr.profile() is default
    with pytest.raises(ValueError, match="profile"):
        ehr.profile("cerner")

    # the SandboxEhr's own properties are the default profile's
    assert (ehr.fhir_base, ehr.issuer) == (default.fhir_base, default.issuer)
    assert (ehr.authorization_endpoint, ehr.token_endpoint, ehr.jwks_uri) == (
        default.authorization_endpoint,
        default.token_endpoint,
        default.jwks_uri,
    )
    assert ehr.epic_status_url == default.epic_status_url
    assert default.fhir_base == f"{base}/fhir/r4"
    assert default.issuer == f"{base}/oauth2"
    assert default.authorization_endpoint == f"{base}/oauth2/authorize"
    assert default.token_endpoint == f"{base}/oauth2/token"

    assert epic.fhir_base == f"{base}/epic/api/FHIR/R4"
    assert epic.issuer == f"{base}/epic/oauth2"
    assert epic.authorization_endpoint == f"{base}/epic/oauth2/authorize"
    assert epic.token_endpoint == f"{base}/epic/oauth2/token"
    assert epic.epic_status_url == (
        f"{base}/epic/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus"
    )

    auth = f"http://localhost:{port}/oracle/tenants/{ORACLE_TENANT_ID}"
    assert oracle.fhir_base == f"{base}/oracle/r4/{ORACLE_TENANT_ID}"
    assert oracle.fhir_host == "127.0.0.1" and oracle.auth_host == "localhost"
    assert oracle.auth_base_url == f"http://localhost:{port}"
    assert oracle.issuer == f"{auth}/oidc/idsp/"
    assert oracle.authorization_endpoint == (
        f"{auth}/protocols/oauth2/profiles/smart-v1/personas/provider/authorize"
    )
    assert oracle.token_endpoint == f"{auth}/protocols/oauth2/profiles/smart-v1/token"
    assert oracle.epic_status_url is None

    for p in ehr.profiles:
        assert p.issuer.rstrip("/") != p.fhir_base
        assert not p.fhir_base.startswith(p.issuer)
    assert {p.vendor for p in ehr.profiles} == {"smart", "epic", "oracle"}


# --- discovery ------------------------------------------------------------------------------------


def test_discovery_advertises_the_issuer_not_the_fhir_base(
    http: httpx.Client, profile: EhrProfile
) -> None:
    smart = http.get(profile.smart_configuration_url)
    assert smart.status_code == 200
    doc = smart.json()
    assert doc["issuer"] == profile.issuer != profile.fhir_base
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["authorization_endpoint"] == profile.authorization_endpoint
    assert doc["token_endpoint"] == profile.token_endpoint
    assert doc["jwks_uri"] == profile.jwks_uri
    assert doc["code_challenge_methods_supported"] == ["S256"]

    # OpenID Connect discovery at the issuer (its trailing "/" dropped) says the same
    assert profile.openid_configuration_url == (
        profile.issuer.rstrip("/") + "/.well-known/openid-configuration"
    )
    oidc = http.get(profile.openid_configuration_url).json()
    assert oidc["issuer"] == profile.issuer
    assert oidc["jwks_uri"] == profile.jwks_uri
    assert oidc["authorization_endpoint"] == profile.authorization_endpoint
    assert oidc["token_endpoint"] == profile.token_endpoint
    assert oidc["authorization_response_iss_parameter_supported"] is True
    assert {"iss", "aud", "exp", "iat", "nonce", "fhirUser"} <= set(oidc["claims_supported"])

    jwks = http.get(profile.jwks_uri).json()
    assert jwks == profile.public_jwks
    assert jwks["keys"][0]["kty"] == "RSA" and "d" not in jwks["keys"][0]

    cap = http.get(f"{profile.fhir_base}/metadata").json()
    assert cap["fhirVersion"] == "4.0.1"
    assert cap["implementation"]["url"] == profile.fhir_base
    uris = {
        e["url"]: e["valueUri"] for e in cap["rest"][0]["security"]["extension"][0]["extension"]
    }
    assert uris == {
        "authorize": profile.authorization_endpoint,
        "token": profile.token_endpoint,
    }


def test_each_profile_signs_with_its_own_key(http: httpx.Client, ehr: SandboxEhr) -> None:
    kids = {http.get(p.jwks_uri).json()["keys"][0]["kid"] for p in ehr.profiles}
    assert len(kids) == 3


# --- RFC 9207 iss on authorization responses -------------------------------------------------------


def test_iss_on_code_and_error_redirects(http: httpx.Client, profile: EhrProfile) -> None:
    _, challenge = pkce_pair()
    launch = profile.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    ok = http.get(
        profile.authorization_endpoint, params=authorize_params(profile, challenge, launch=launch)
    )
    assert ok.status_code == 302
    query = query_of(ok.headers["location"])
    assert "code" in query and query["iss"] == profile.issuer

    errors: list[dict[str, str]] = [
        {"aud": "https://other-ehr.example/fhir/r4"},
        {"code_challenge_method": "plain"},
        {"response_type": "token"},
        {"state": ""},
        {"launch": "not-a-launch"},
    ]
    for override in errors:
        params = authorize_params(
            profile,
            challenge,
            launch=profile.make_launch(appointment_id=CLINIC_APPT.id, user="clinician"),
        )
        params.update(override)
        response = http.get(profile.authorization_endpoint, params=params)
        assert response.status_code == 302, override
        assert response.headers["location"].startswith(LAUNCH_CALLBACK + "?")
        query = query_of(response.headers["location"])
        assert query["error"] and "code" not in query, override
        assert query["iss"] == profile.issuer, override

    denied = http.get(
        profile.authorization_endpoint,
        params=authorize_params(
            profile,
            challenge,
            launch=profile.make_launch(appointment_id=CLINIC_APPT.id, user="clinician", deny=True),
        ),
    )
    assert query_of(denied.headers["location"])["error"] == "access_denied"
    assert query_of(denied.headers["location"])["iss"] == profile.issuer


def test_iss_on_standalone_signin_redirects(http: httpx.Client, profile: EhrProfile) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(profile, challenge, redirect_uri=SIGNIN_CALLBACK)
    page = http.get(profile.authorization_endpoint, params=params)
    assert page.status_code == 200
    link = find_signin_link(page.text, seed.ANALYST_ID)
    assert link.startswith(profile.signin_endpoint + "?")
    redirect = http.get(link)
    query = query_of(redirect.headers["location"])
    assert query["iss"] == profile.issuer and query["state"] == params["state"]
    token = exchange(http, profile, query["code"], verifier, redirect_uri=SIGNIN_CALLBACK)
    claims = verify_id_token(http, profile, token.json()["id_token"])
    assert claims["fhirUser"] == f"{profile.fhir_base}/Practitioner/{seed.ANALYST_ID}"
    assert claims["nonce"] == params["nonce"]

    page = http.get(
        profile.authorization_endpoint,
        params=authorize_params(profile, challenge, redirect_uri=SIGNIN_CALLBACK),
    )
    denied = query_of(http.get(find_signin_link(page.text, deny=True)).headers["location"])
    assert denied["error"] == "access_denied" and denied["iss"] == profile.issuer


# --- id_token ---------------------------------------------------------------------------------------


def test_id_token_claims(http: httpx.Client, profile: EhrProfile, client_keys: ClientKeys) -> None:
    params, body = _launch_tokens(http, profile, client_keys, nonce="n-7c1d0e")
    header = jwt.get_unverified_header(body["id_token"])
    assert header["alg"] == "RS256" and header["kid"]
    claims = verify_id_token(http, profile, body["id_token"])
    assert claims["iss"] == profile.issuer != profile.fhir_base
    assert claims["aud"] == CLIENT_ID
    assert claims["nonce"] == "n-7c1d0e" == params["nonce"]
    assert claims["exp"] > claims["iat"]
    # fhirUser is an absolute URL at this EHR's FHIR base
    assert claims["fhirUser"] == f"{profile.fhir_base}/Practitioner/{CLINIC_APPT.practitioner_id}"
    assert claims["fhirUser"].startswith("http")
    assert CLINIC_APPT.practitioner_id not in claims["sub"]

    _, patient = _launch_tokens(http, profile, None, user="patient")
    claims = verify_id_token(http, profile, patient["id_token"])
    assert claims["fhirUser"] == f"{profile.fhir_base}/Patient/{CLINIC_APPT.patient_id}"

    # no nonce asked for, none echoed (OpenID Connect: nonce is the client's to send)
    _, no_nonce = _launch_tokens(http, profile, client_keys, nonce=None)
    assert "nonce" not in verify_id_token(http, profile, no_nonce["id_token"])


# --- launch context ---------------------------------------------------------------------------------


def test_launch_context_default(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    profile = ehr.profile("default")
    _, body = _launch_tokens(http, profile, client_keys)
    assert body["patient"] == CLINIC_APPT.patient_id
    assert body["encounter"] == CLINIC_APPT.encounter_id
    assert body["fhirContext"] == [{"reference": f"Appointment/{CLINIC_APPT.id}"}]
    _, body = _launch_tokens(http, profile, client_keys, appointment_id=PLAIN_APPT.id)
    assert "encounter" not in body
    assert body["fhirContext"] == [{"reference": f"Appointment/{PLAIN_APPT.id}"}]


def test_launch_context_epic(http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys) -> None:
    epic = ehr.profile("epic")
    _, body = _launch_tokens(http, epic, client_keys)
    assert body["patient"] == CLINIC_APPT.patient_id
    assert body["encounter"] == CLINIC_APPT.encounter_id
    assert body["fhirContext"] == [
        {"reference": f"Appointment/{CLINIC_APPT.id}"},
        {"reference": f"Encounter/{CLINIC_APPT.encounter_id}"},
    ]
    _, body = _launch_tokens(http, epic, client_keys, appointment_id=PLAIN_APPT.id)
    assert body["fhirContext"] == [{"reference": f"Appointment/{PLAIN_APPT.id}"}]

    # a group visit: Epic passes the conference id in the launch URL (sessionId), not in the
    # token response
    url = epic.launch_url("cfg-e", appointment_id=GROUP_APPT.id, user="patient")
    assert query_of(url)["sessionId"] == seed.CONFERENCE_ID
    assert query_of(url)["iss"] == epic.fhir_base
    assert "sessionId" not in query_of(
        epic.launch_url("cfg-e", appointment_id=CLINIC_APPT.id, user="patient")
    )
    _, body = _launch_tokens(http, epic, client_keys, appointment_id=GROUP_APPT.id)
    assert body["fhirContext"] == [
        {"reference": f"Appointment/{GROUP_APPT.id}"},
        {"reference": f"Encounter/{GROUP_APPT.encounter_id}"},
    ]
    assert seed.CONFERENCE_ID not in str(body)


def test_launch_context_oracle_is_encounter_only(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    oracle = ehr.profile("oracle")
    for appt in (CLINIC_APPT, GROUP_APPT):
        _, body = _launch_tokens(http, oracle, client_keys, appointment_id=appt.id)
        assert body["patient"] == appt.patient_id
        assert body["encounter"] == appt.encounter_id
        assert "fhirContext" not in body
        assert "Appointment" not in str(body) and appt.id not in str(body)
        assert seed.CONFERENCE_ID not in str(body)

        auth = {"Authorization": f"Bearer {body['access_token']}"}
        encounter = http.get(f"{oracle.fhir_base}/Encounter/{appt.encounter_id}", headers=auth)
        assert encounter.status_code == 200
        assert "appointment" not in encounter.json()
        assert encounter.json()["subject"]["reference"] == f"Patient/{appt.patient_id}"

    url = oracle.launch_url("cfg-o", appointment_id=GROUP_APPT.id, user="clinician")
    assert set(query_of(url)) == {"iss", "launch"}
    with pytest.raises(ValueError, match="encounter"):
        oracle.make_launch(appointment_id=PLAIN_APPT.id, user="patient")
    assert {a.id for a in oracle.appointments()} == {
        a.id for a in seed.APPOINTMENTS.values() if a.encounter_id
    }


# --- Oracle: the authorization server on its own host --------------------------------------------


def test_oracle_authorization_server_on_its_own_host(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    oracle = ehr.profile("oracle")
    for url in (oracle.authorization_endpoint, oracle.token_endpoint, oracle.issuer):
        assert urlsplit(url).hostname == "localhost"
        assert urlsplit(url).port == urlsplit(ehr.base_url).port
    assert urlsplit(oracle.fhir_base).hostname == "127.0.0.1"

    # a full confidential launch through host localhost (authorize, token with the assertion's
    # aud = the localhost token endpoint), FHIR on 127.0.0.1
    _, body = _launch_tokens(http, oracle, client_keys)
    assert oracle.token_requests[-1] == {
        "grant_type": "authorization_code",
        "auth": "private_key_jwt",
    }
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert http.get(f"{oracle.fhir_base}/Patient/{CLINIC_APPT.patient_id}", headers=auth).is_success

    # each server answers on its own host name only
    swap = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}

    def on_other_host(url: str) -> str:
        parts = urlsplit(url)
        assert parts.hostname is not None
        return url.replace(f"//{parts.hostname}:", f"//{swap[parts.hostname]}:", 1)

    _, challenge = pkce_pair()
    params = authorize_params(
        oracle,
        challenge,
        launch=oracle.make_launch(appointment_id=CLINIC_APPT.id, user="clinician"),
    )
    assert http.get(on_other_host(oracle.authorization_endpoint), params=params).status_code == 404
    assert http.post(on_other_host(oracle.token_endpoint), data={}).status_code == 404
    assert http.get(on_other_host(oracle.smart_configuration_url)).status_code == 404
    assert http.get(on_other_host(oracle.openid_configuration_url)).status_code == 404
    assert http.get(on_other_host(f"{oracle.fhir_base}/metadata")).status_code == 404

    # a client assertion made for another profile's token endpoint is refused here
    verifier, challenge = pkce_pair()
    code = authorize_code(
        http,
        oracle,
        authorize_params(
            oracle,
            challenge,
            launch=oracle.make_launch(appointment_id=CLINIC_APPT.id, user="clinician"),
        ),
    )
    wrong_aud = http.post(
        oracle.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": LAUNCH_CALLBACK,
            "code_verifier": verifier,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_keys.assertion(ehr.token_endpoint),
        },
    )
    assert wrong_aud.status_code == 401 and wrong_aud.json()["error"] == "invalid_client"


# --- each EHR knows only its own launches, codes and tokens ----------------------------------------


def test_profiles_do_not_accept_each_others_artifacts(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    default, epic = ehr.profile("default"), ehr.profile("epic")
    _, challenge = pkce_pair()
    # a default launch token at Epic's authorize endpoint
    params = authorize_params(
        epic, challenge, launch=default.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    )
    response = http.get(epic.authorization_endpoint, params=params)
    assert query_of(response.headers["location"])["error"] == "invalid_request"
    # aud must be this EHR's FHIR base
    params = authorize_params(
        epic, challenge, launch=epic.make_launch(appointment_id=CLINIC_APPT.id, user="clinician")
    )
    params["aud"] = default.fhir_base
    response = http.get(epic.authorization_endpoint, params=params)
    assert query_of(response.headers["location"])["error"] == "invalid_request"

    # an Epic code at the default token endpoint: unknown there (and still good at Epic)
    verifier, challenge = pkce_pair()
    code = authorize_code(
        http,
        epic,
        authorize_params(
            epic,
            challenge,
            launch=epic.make_launch(appointment_id=CLINIC_APPT.id, user="clinician"),
        ),
    )
    elsewhere = exchange(http, default, code, verifier)
    assert elsewhere.status_code == 400 and elsewhere.json()["error"] == "invalid_grant"
    token = exchange(http, epic, code, verifier)
    assert token.status_code == 200, token.text

    # an Epic access token at the default FHIR server
    auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
    assert http.get(f"{epic.fhir_base}/Appointment/{CLINIC_APPT.id}", headers=auth).is_success
    assert (
        http.get(f"{default.fhir_base}/Appointment/{CLINIC_APPT.id}", headers=auth).status_code
        == 401
    )


# --- Epic's SetExternalConnectionStatus and AuditEvent per profile -----------------------------------


def test_epic_status_route(http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys) -> None:
    epic, default, oracle = ehr.profile("epic"), ehr.profile("default"), ehr.profile("oracle")
    assert epic.epic_status_url is not None
    token = backend_token(http, epic, client_keys).json()["access_token"]
    response = http.post(
        epic.epic_status_url, json=EPIC_CALL, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    assert epic.epic_status_calls == [EPIC_CALL]
    assert ehr.epic_status_calls == [EPIC_CALL]
    assert default.epic_status_calls == []

    # a token of another EHR is not good here; oracle has no such route
    other = backend_token(http, default, client_keys).json()["access_token"]
    refused = http.post(
        epic.epic_status_url, json=EPIC_CALL, headers={"Authorization": f"Bearer {other}"}
    )
    assert refused.status_code == 401
    assert oracle.epic_status_url is None
    assert (
        http.post(
            f"{oracle.fhir_base.rsplit('/r4/', 1)[0]}/api/epic/2018/Telehealth/ContextLinking/"
            "SetExternalConnectionStatus",
            json=EPIC_CALL,
        ).status_code
        == 404
    )
    assert len(ehr.epic_status_calls) == 1


def test_audit_event_per_profile(
    http: httpx.Client, profile: EhrProfile, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    token = backend_token(http, profile, client_keys).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    created = http.post(f"{profile.fhir_base}/AuditEvent", json=AUDIT_EVENT, headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["location"].startswith(f"{profile.fhir_base}/AuditEvent/")
    assert profile.audit_events == [AUDIT_EVENT]
    assert ehr.audit_events == [AUDIT_EVENT]
    assert profile.token_requests == [
        {"grant_type": "client_credentials", "auth": "private_key_jwt"}
    ]
    for other in ehr.profiles:
        if other is not profile:
            assert other.audit_events == []


# --- the EHR page -------------------------------------------------------------------------------------


_LINK_RE = re.compile(
    r'<a class="launch" data-role="(\w+)" data-appointment="([^"]+)" href="([^"]+)" '
    r'data-profile="(\w+)"'
)


def test_page_lists_each_profile_with_buttons(http: httpx.Client, ehr: SandboxEhr) -> None:
    ehr.profile("epic").config_id = "cfg-epic"
    try:
        page = http.get(
            f"{ehr.base_url}/", params={"config": "cfg-d", "config_oracle": "cfg-o"}
        ).text
    finally:
        ehr.profile("epic").config_id = None
    for p in ehr.profiles:
        assert f'<section class="profile" data-profile="{p.name}"' in page
        assert html.escape(p.fhir_base) in page and html.escape(p.issuer) in page
    links = _LINK_RE.findall(page)
    expected_config = {"default": "cfg-d", "epic": "cfg-epic", "oracle": "cfg-o"}
    for name in PROFILE_NAMES:
        profile = ehr.profile(name)
        mine = [(role, appt, html.unescape(href)) for role, appt, href, p in links if p == name]
        assert {(role, appt) for role, appt, _ in mine} == {
            (role, a.id) for a in profile.appointments() for role in ("clinician", "patient")
        }
        for role, _, url in mine:
            kind = "provider" if role == "clinician" else "patient"
            assert url.startswith(f"{ehr.connector_url}/api/launch/{kind}/{expected_config[name]}?")
            assert query_of(url)["iss"] == profile.fhir_base
        # a launch token from the page works at that profile's authorize endpoint
        for role, _, url in mine[:2]:
            _, challenge = pkce_pair()
            params = authorize_params(profile, challenge, launch=query_of(url)["launch"])
            assert authorize_code(http, profile, params), role
    assert {a for _, a, _, p in links if p == "oracle"} == {
        a.id for a in seed.APPOINTMENTS.values() if a.encounter_id
    }
    assert 'class="launch"' not in http.get(f"{ehr.base_url}/").text  # no config ids set
