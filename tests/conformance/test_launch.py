"""SMART EHR launches (provider and patient) against oidc-provider, a certified authorization
server whose issuer (``/oauth2``) is not the FHIR base (``/fhir/r4``), as at Epic."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from connector_core.domain.models import TenantConfig
from devtools.conformance import ConformanceServer
from tests.conformance.conftest import (
    OTHER,
    SOLO,
    forget_mapping,
    is_entra_picker,
    practitioner_of,
    set_mapping,
)
from tests.e2e.launch.helpers import Landing, pick_account
from tests.stack import Stack

pytestmark = pytest.mark.slow


def _private_key_jwt_code_exchanges(cs: ConformanceServer) -> list[dict[str, object]]:
    return [
        r
        for r in cs.token_requests()
        if r["grantType"] == "authorization_code" and r["status"] == 200
    ]


def test_provider_launch_first_time_signs_in_then_goes_straight_into_the_meeting(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    s = fresh_stack
    practitioner = practitioner_of(SOLO)
    forget_mapping(s, cs, practitioner)

    browser = s.browser()
    response = browser.get(cs.launch_url(config.id, appointment_id=SOLO, user="clinician"))
    assert is_entra_picker(response), (response.status_code, cs.token_requests(), cs.server_log())
    upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
    first = Landing(pick_account(browser, response, upn))
    assert first.host == urlsplit(s.sandbox.graph_url).netloc, first.response.text[:800]
    assert first.meeting_id and first.mode == "all"
    meeting = s.sandbox.graph.meetings[first.meeting_id]
    assert meeting.organizer_oid == s.sandbox.entra.user_for_practitioner(practitioner).oid

    # The authorization server saw a SMART EHR launch and a confidential-client exchange.
    authorize = [r for r in cs.authorize_requests() if r["launch"]]
    assert authorize and authorize[-1]["aud"] == cs.fhir_base
    assert set(authorize[-1]["scope"].split()) >= {"launch", "openid", "fhirUser"}
    exchanges = _private_key_jwt_code_exchanges(cs)
    assert exchanges and all(r["authMethod"] == "private_key_jwt" for r in exchanges)

    # The same clinician again, another browser: no Microsoft sign-in, the connector's callback
    # answers 302 straight to the meeting's joinWebUrl.
    response = s.browser().get(cs.launch_url(config.id, appointment_id=SOLO, user="clinician"))
    callback = [r for r in response.history if urlsplit(str(r.url)).path == "/api/launch/callback"]
    assert callback, [str(r.url) for r in response.history]
    assert callback[0].status_code == 302
    assert callback[0].headers["location"].startswith(s.sandbox.graph_url)
    assert not any("/oauth2/v2.0/authorize" in str(r.url) for r in response.history)
    assert Landing(response).meeting_id == first.meeting_id


def test_patient_launch_joins_the_meeting_as_a_guest(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    s = fresh_stack
    practitioner = practitioner_of(SOLO)
    set_mapping(s, cs, practitioner)
    clinician = Landing(
        s.browser().get(cs.launch_url(config.id, appointment_id=SOLO, user="clinician"))
    )
    assert clinician.meeting_id, (clinician.response.status_code, clinician.response.text[:800])

    patient = Landing(
        s.browser().get(cs.launch_url(config.id, appointment_id=SOLO, user="patient"))
    )
    assert patient.meeting_id == clinician.meeting_id, patient.response.text[:800]
    assert patient.mode == "guest"
    assert "anon=true" in str(patient.response.url)


def test_patient_launch_before_the_clinician_reads_the_appointment_and_waits(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    s = fresh_stack
    forget_mapping(s, cs, practitioner_of(OTHER))
    patient = s.browser()
    waiting = patient.get(cs.launch_url(config.id, appointment_id=OTHER, user="patient"))
    assert waiting.status_code == 200, waiting.text[:800]
    assert 'http-equiv="refresh"' in waiting.text, waiting.text[:800]
    # The connector read the visit's Appointment with the patient's token, at the FHIR base
    # (not the issuer), and the certified server's token check let it through.
    reads = [r for r in cs.fhir_requests() if r["method"] == "GET" and "/Appointment/" in r["path"]]
    assert reads and reads[-1]["status"] == 200, cs.fhir_requests()
    assert reads[-1]["path"].startswith(urlsplit(cs.fhir_base).path + "/")
