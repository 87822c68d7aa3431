"""A clinician and a patient start the same visit from each sandbox EHR profile's page.

The profiles behave like the EHRs they stand for (issuer != FHIR base, RFC 9207 ``iss``, absolute
``fhirUser``, Epic's and Oracle Health's launch context, Oracle's authorization server on its own
host): the connector must work against each, exactly as ``make run`` offers them.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from connector_core.domain.models import EhrVendor, TenantConfig
from connector_core.errors import ConflictError
from devtools.sandbox import seed
from devtools.sandbox.ehr import PROFILE_NAMES, EhrProfile
from tests.e2e.launch.helpers import Landing, is_entra_picker, pick_account
from tests.stack import Stack

APPOINTMENT = "appt-93af2c6b"  # has an encounter, so every profile can launch it


def _config(stack: Stack, profile: EhrProfile) -> TenantConfig:
    def create() -> TenantConfig:
        return stack.create_approved_config(
            fhir_base_url=profile.fhir_base, vendor=EhrVendor(profile.vendor)
        )

    try:
        return create()
    except ConflictError as conflict:  # a leftover of an earlier test with the same URL
        stack.container().configs.delete(stack.tenant(0).tid, str(conflict.extra["existingId"]))
        return create()


@pytest.fixture(params=PROFILE_NAMES)
def profile_config(
    request: pytest.FixtureRequest, fresh_stack: Stack
) -> Iterator[tuple[EhrProfile, TenantConfig]]:
    profile = fresh_stack.sandbox.ehr.profile(request.param)
    config = _config(fresh_stack, profile)
    try:
        yield profile, config
    finally:
        fresh_stack.container().configs.delete(config.tenant_id, config.id)


def _button(page: str, profile: EhrProfile, role: str) -> str:
    match = re.search(
        rf'<a class="launch" data-role="{role}" data-appointment="{APPOINTMENT}" '
        rf'href="([^"]+)" data-profile="{profile.name}"',
        page,
    )
    assert match, f"no {role} button for {APPOINTMENT} in the {profile.name} table"
    return html.unescape(match.group(1))


def test_clinician_and_patient_start_a_visit_from_each_profile(
    fresh_stack: Stack, profile_config: tuple[EhrProfile, TenantConfig]
) -> None:
    s = fresh_stack
    profile, config = profile_config
    param = "config" if profile.name == "default" else f"config_{profile.name}"
    clinician, patient = s.browser(), s.browser()
    try:
        page = clinician.get(f"{s.sandbox.ehr_url}/", params={param: config.id}).text

        response = clinician.get(_button(page, profile, "clinician"))
        # the browser really went through this EHR's authorization server
        assert profile.auth_host in {urlsplit(str(r.url)).hostname for r in response.history}
        if is_entra_picker(response):  # the clinician's first launch from this EHR
            practitioner = seed.APPOINTMENTS[APPOINTMENT].practitioner_id
            upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
            response = pick_account(clinician, response, upn)
        staff = Landing(response)
        assert staff.meeting_id, (response.status_code, response.text[:800])
        assert staff.mode == "all"

        guest = Landing(patient.get(_button(page, profile, "patient")))
        assert guest.meeting_id == staff.meeting_id, guest.response.text[:800]
        assert guest.mode == "guest"
    finally:
        clinician.close()
        patient.close()


def test_epic_group_visit_by_session_id_reaches_one_meeting(fresh_stack: Stack) -> None:
    """Epic passes a group visit's conference id only as the launch URL's ``sessionId``
    (``%CONFERENCEID%`` on the group-visit record), not in the token's context: the clinician
    and both patients of the two appointments of one group visit reach one meeting."""
    s = fresh_stack
    profile = s.sandbox.ehr.profile("epic")
    config = _config(s, profile)
    clinician = s.browser()
    patients = [s.browser(), s.browser()]
    try:
        first, second = seed.GROUP_APPOINTMENT_IDS
        url = profile.launch_url(config.id, appointment_id=first, user="clinician")
        assert "sessionId=" in url  # as Epic's group-visit integration record sends it
        response = clinician.get(url)
        if is_entra_picker(response):
            practitioner = seed.APPOINTMENTS[first].practitioner_id
            upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
            response = pick_account(clinician, response, upn)
        staff = Landing(response)
        assert staff.meeting_id, response.text[:800]
        for browser, appointment in zip(patients, (first, second), strict=True):
            guest = Landing(
                browser.get(
                    profile.launch_url(config.id, appointment_id=appointment, user="patient")
                )
            )
            assert guest.meeting_id == staff.meeting_id, guest.response.text[:800]
            assert guest.mode == "guest"
    finally:
        clinician.close()
        for browser in patients:
            browser.close()
        s.container().configs.delete(config.tenant_id, config.id)


def test_an_unfilled_epic_token_in_the_launch_url_is_a_clear_page(fresh_stack: Stack) -> None:
    s = fresh_stack
    profile = s.sandbox.ehr.profile("epic")
    config = _config(s, profile)
    try:
        url = profile.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
        response = s.browser().get(url + "&sessionId=%25CONFERENCEID%25")
        assert response.status_code == 400, response.text[:500]
        assert "did not fill in the visit" in response.text
        assert "sessionId=%CONFERENCEID%" in html.unescape(response.text)
        assert "Reference (correlation id)" in response.text
    finally:
        s.container().configs.delete(config.tenant_id, config.id)
