"""Fault injection, the appointments page and the seed's privacy list."""

from __future__ import annotations

import html
import re
import time

import httpx
import pytest

from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr
from tests.integration.sandbox_ehr.conftest import (
    ClientKeys,
    authorize_code,
    authorize_params,
    exchange,
    pkce_pair,
    query_of,
)


def _user_token(http: httpx.Client, ehr: SandboxEhr, keys: ClientKeys) -> str:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id="appt-93af2c6b", user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    return str(exchange(http, ehr, code, verifier, keys=keys).json()["access_token"])


def test_fail_next_token_then_recovers(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    verifier, challenge = pkce_pair()
    launch = ehr.make_launch(appointment_id="appt-6b1e0d34", user="clinician")
    code = authorize_code(http, ehr, authorize_params(ehr, challenge, launch=launch))
    ehr.fail_next("token")
    failed = exchange(http, ehr, code, verifier, keys=client_keys)
    assert failed.status_code == 500
    assert failed.json()["error"] == "server_error"
    # the fault answered before looking at the code, so it is still good
    assert exchange(http, ehr, code, verifier, keys=client_keys).status_code == 200


def test_fail_next_fhir_with_delay(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    auth = {"Authorization": f"Bearer {_user_token(http, ehr, client_keys)}"}
    url = f"{ehr.fhir_base}/Appointment/appt-93af2c6b"
    ehr.fail_next("fhir", status=504, delay=0.4)
    started = time.monotonic()
    assert http.get(url, headers=auth).status_code == 504
    assert time.monotonic() - started >= 0.4
    ehr.fail_next("fhir", status=200, delay=1.0)  # slow but successful
    with pytest.raises(httpx.ReadTimeout):
        http.get(url, headers=auth, timeout=0.3)
    assert http.get(url, headers=auth).status_code == 200
    with pytest.raises(ValueError, match="endpoint"):
        ehr.fail_next("nope")


def test_set_down(http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys) -> None:
    ehr.set_down(True)
    for url in (
        f"{ehr.fhir_base}/.well-known/smart-configuration",
        f"{ehr.fhir_base}/metadata",
        ehr.authorization_endpoint,
        f"{ehr.base_url}/",
    ):
        assert http.get(url).status_code == 503, url
    assert http.post(ehr.token_endpoint, data={"grant_type": "x"}).status_code == 503
    ehr.set_down(False)
    assert http.get(f"{ehr.fhir_base}/metadata").status_code == 200


def test_appointments_page_links(http: httpx.Client, ehr: SandboxEhr) -> None:
    page = http.get(f"{ehr.base_url}/", params={"config": "cfg-42"})
    assert page.status_code == 200
    assert "Sandbox EHR — today's appointments" in page.text
    links = re.findall(
        r'<a class="launch" data-role="(\w+)" data-appointment="([^"]+)" href="([^"]+)"',
        page.text,
    )
    assert {(role, appt) for role, appt, _ in links} == {
        (role, appt) for appt in seed.APPOINTMENTS for role in ("clinician", "patient")
    }
    for role, _, href in links:
        url = html.unescape(href)
        kind = "provider" if role == "clinician" else "patient"
        assert url.startswith(f"{ehr.connector_url}/api/launch/{kind}/cfg-42?")
        assert query_of(url)["iss"] == ehr.fhir_base
    # a launch token from the page works at the authorize endpoint
    url = html.unescape(links[0][2])
    _, challenge = pkce_pair()
    params = authorize_params(ehr, challenge, launch=query_of(url)["launch"])
    assert authorize_code(http, ehr, params)

    ehr.default_config_id = "cfg-default"
    assert "/api/launch/provider/cfg-default?" in http.get(f"{ehr.base_url}/").text
    ehr.default_config_id = None
    assert 'class="launch"' not in http.get(f"{ehr.base_url}/").text


def test_seed_sensitive_values() -> None:
    values = set(seed.SENSITIVE_VALUES)
    for patient in seed.PATIENTS.values():
        assert {patient.id, patient.given, patient.family, patient.name, patient.mrn} <= values
    for prac in seed.PRACTITIONERS.values():
        assert {prac.id, prac.given, prac.family, prac.name} <= values
    for appt in seed.APPOINTMENTS.values():
        assert appt.id in values
        if appt.encounter_id:
            assert appt.encounter_id in values
    assert seed.CONFERENCE_ID in values
    assert all(len(v) >= 5 for v in values)  # distinctive enough to scan for
    assert len(seed.CLINICIAN_IDS) == 3 and len(seed.PATIENTS) == 4
