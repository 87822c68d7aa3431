"""SMART Backend Services, AuditEvent and Epic's SetExternalConnectionStatus."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr
from tests.integration.sandbox_ehr.conftest import (
    ClientKeys,
    authorize_code,
    authorize_params,
    backend_token,
    exchange,
    pkce_pair,
)

AUDIT_EVENT: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "type": {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110100",
        "display": "Application Activity",
    },
    "subtype": [{"system": "urn:ehr-virtual-visit:event", "code": "connect"}],
    "action": "E",
    "recorded": "2025-01-01T10:00:00Z",
    "outcome": "0",
    "agent": [{"who": {"reference": "Practitioner/prac-7f3a91c2"}, "requestor": True}],
    "source": {"observer": {"display": "EHR virtual-visit connector"}},
    "entity": [{"what": {"reference": "Appointment/appt-6b1e0d34"}}],
}
EPIC_CALL = {
    "ConferenceID": seed.CONFERENCE_ID,
    "ExternalID": "participant-1",
    "ExternalIDType": "External",
    "VendorName": "EHR virtual-visit connector",
    "ConnectionStatus": "Connected",
}


def _system_token(http: httpx.Client, ehr: SandboxEhr, keys: ClientKeys) -> str:
    response = backend_token(http, ehr, keys)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/AuditEvent.c"
    return str(body["access_token"])


def test_audit_event_with_backend_token(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    token = _system_token(http, ehr, client_keys)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    created = http.post(f"{ehr.fhir_base}/AuditEvent", json=AUDIT_EVENT, headers=headers)
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    assert location.startswith(f"{ehr.fhir_base}/AuditEvent/")
    assert ehr.audit_events == [AUDIT_EVENT]
    resource_url = location.split("/_history")[0]
    assert http.get(resource_url, headers=headers).status_code == 403  # .c cannot read
    reader = backend_token(http, ehr, client_keys, scope="system/AuditEvent.rs").json()
    read = http.get(resource_url, headers={"Authorization": f"Bearer {reader['access_token']}"})
    assert read.status_code == 200 and read.json()["recorded"] == AUDIT_EVENT["recorded"]

    assert http.post(f"{ehr.fhir_base}/AuditEvent", json=AUDIT_EVENT).status_code == 401
    invalid = dict(AUDIT_EVENT, recorded="yesterday")
    assert (
        http.post(f"{ehr.fhir_base}/AuditEvent", json=invalid, headers=headers).status_code == 400
    )
    missing = {k: v for k, v in AUDIT_EVENT.items() if k != "source"}
    response = http.post(f"{ehr.fhir_base}/AuditEvent", json=missing, headers=headers)
    assert response.status_code == 400 and "source" in response.text
    assert len(ehr.audit_events) == 1


def test_audit_event_refuses_user_token_without_scope(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id="appt-6b1e0d34", user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    user_token = exchange(http, ehr, code, verifier, keys=client_keys).json()["access_token"]
    response = http.post(
        f"{ehr.fhir_base}/AuditEvent",
        json=AUDIT_EVENT,
        headers={"Authorization": f"Bearer {user_token}"},
    )
    assert response.status_code == 403


def test_backend_services_assertion_rules(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    audience = ehr.token_endpoint
    jti = uuid.uuid4().hex
    assert (
        backend_token(
            http, ehr, client_keys, assertion=client_keys.assertion(audience, jti=jti)
        ).status_code
        == 200
    )
    replay = backend_token(
        http, ehr, client_keys, assertion=client_keys.assertion(audience, jti=jti)
    )
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"
    assert "replay" in replay.json()["error_description"]

    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        "expired": client_keys.assertion(audience, exp_in=-60),
        "too long": client_keys.assertion(audience, exp_in=600),
        "wrong aud": client_keys.assertion(f"{ehr.fhir_base}/token"),
        "wrong iss": client_keys.assertion(audience, iss="someone-else"),
        "wrong key": client_keys.assertion(audience, key=other_key),
        "RS256": client_keys.assertion(audience, alg="RS256"),
    }
    for why, assertion in refused.items():
        response = backend_token(http, ehr, client_keys, assertion=assertion)
        assert response.status_code == 401, why
        assert response.json()["error"] == "invalid_client", why

    es384 = backend_token(
        http, ehr, client_keys, assertion=client_keys.assertion(audience, alg="ES384")
    )
    assert es384.status_code == 200, es384.text

    public = http.post(
        audience,
        data={
            "grant_type": "client_credentials",
            "client_id": ehr.smart_client_id,
            "scope": "system/AuditEvent.c",
        },
    )
    assert public.json()["error"] == "invalid_client"
    user_scope = backend_token(http, ehr, client_keys, scope="user/AuditEvent.c")
    assert user_scope.json()["error"] == "invalid_scope"
    assert backend_token(http, ehr, client_keys, scope="system/AuditEvent.write").status_code == 200


def test_epic_set_external_connection_status(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    token = _system_token(http, ehr, client_keys)
    headers = {"Authorization": f"Bearer {token}"}
    response = http.post(ehr.epic_status_url, json=EPIC_CALL, headers=headers)
    assert response.status_code == 200, response.text
    assert ehr.epic_status_calls == [EPIC_CALL]

    incomplete = {k: v for k, v in EPIC_CALL.items() if k != "ConnectionStatus"}
    response = http.post(ehr.epic_status_url, json=incomplete, headers=headers)
    assert response.status_code == 400 and "ConnectionStatus" in response.text
    assert http.post(ehr.epic_status_url, json=EPIC_CALL).status_code == 401
    assert len(ehr.epic_status_calls) == 1


@pytest.mark.parametrize("endpoint", ["auditevent", "epic", "backend-token"])
def test_fail_next_backend_endpoints(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys, endpoint: str
) -> None:
    token = _system_token(http, ehr, client_keys)
    headers = {"Authorization": f"Bearer {token}"}

    def call() -> httpx.Response:
        if endpoint == "auditevent":
            return http.post(f"{ehr.fhir_base}/AuditEvent", json=AUDIT_EVENT, headers=headers)
        if endpoint == "epic":
            return http.post(ehr.epic_status_url, json=EPIC_CALL, headers=headers)
        return backend_token(http, ehr, client_keys)

    ehr.fail_next(endpoint, status=503, count=2)
    assert [call().status_code for _ in range(3)] == [
        503,
        503,
        200 if endpoint == "epic" or endpoint == "backend-token" else 201,
    ]


# --- conditional create and search by identifier (the write-back's exactly-once) ----------------


def _with_writeback_id(value: str) -> dict[str, Any]:
    return {
        **AUDIT_EVENT,
        "entity": [
            *AUDIT_EVENT["entity"],
            {"what": {"identifier": {"system": "urn:ehr-virtual-visit:writeback", "value": value}}},
        ],
    }


def test_conditional_create_and_search_by_identifier(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    writer = _system_token(http, ehr, client_keys)
    headers = {"Authorization": f"Bearer {writer}", "Content-Type": "application/fhir+json"}
    key = uuid.uuid4().hex
    condition = {"If-None-Exist": f"entity:identifier=urn:ehr-virtual-visit:writeback|{key}"}
    first = http.post(
        f"{ehr.fhir_base}/AuditEvent", json=_with_writeback_id(key), headers=headers | condition
    )
    assert first.status_code == 201
    again = http.post(
        f"{ehr.fhir_base}/AuditEvent", json=_with_writeback_id(key), headers=headers | condition
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    unsupported = http.post(
        f"{ehr.fhir_base}/AuditEvent",
        json=_with_writeback_id(key),
        headers=headers | {"If-None-Exist": "patient=Patient/1"},
    )
    assert unsupported.status_code == 400
    # Search by the identifier needs a system read scope.
    params = {"entity:identifier": f"urn:ehr-virtual-visit:writeback|{key}"}
    assert (
        http.get(f"{ehr.fhir_base}/AuditEvent", params=params, headers=headers).status_code == 403
    )
    reader = backend_token(http, ehr, client_keys, scope="system/AuditEvent.read").json()
    read_headers = {"Authorization": f"Bearer {reader['access_token']}"}
    found = http.get(f"{ehr.fhir_base}/AuditEvent", params=params, headers=read_headers)
    assert found.status_code == 200 and found.json()["total"] == 1
    none = http.get(
        f"{ehr.fhir_base}/AuditEvent",
        params={"entity:identifier": "urn:ehr-virtual-visit:writeback|absent"},
        headers=read_headers,
    )
    assert none.json()["total"] == 0 and none.json()["entry"] == []
    metadata = http.get(f"{ehr.fhir_base}/metadata").json()
    audit = next(r for r in metadata["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert audit["conditionalCreate"] is True


def test_a_server_without_conditional_create_ignores_the_condition(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    ehr.ignore_if_none_exist = True
    try:
        writer = _system_token(http, ehr, client_keys)
        headers = {
            "Authorization": f"Bearer {writer}",
            "Content-Type": "application/fhir+json",
            "If-None-Exist": "entity:identifier=urn:ehr-virtual-visit:writeback|dup",
        }
        for _ in range(2):
            response = http.post(
                f"{ehr.fhir_base}/AuditEvent", json=_with_writeback_id("dup"), headers=headers
            )
            assert response.status_code == 201
        metadata = http.get(f"{ehr.fhir_base}/metadata").json()
        audit = next(r for r in metadata["rest"][0]["resource"] if r["type"] == "AuditEvent")
        assert audit["conditionalCreate"] is False
        # Then a conditional create that the server does honour finds two: 412.
        ehr.ignore_if_none_exist = False
        response = http.post(
            f"{ehr.fhir_base}/AuditEvent", json=_with_writeback_id("dup"), headers=headers
        )
        assert response.status_code == 412
    finally:
        ehr.ignore_if_none_exist = False
