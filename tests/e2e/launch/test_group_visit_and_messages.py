"""Group visits the way Epic runs them, and callback pages that tell the truth, through the local
host over real HTTP.

Epic passes the group visit's conference id only as the launch URL's ``sessionId`` (the
group-visit integration record's ``%CONFERENCEID%``): two clinicians, an interpreter and two
patients of one group visit reach one meeting, whoever launches first.
"""

from __future__ import annotations

import html
from collections.abc import Iterator

import httpx
import pytest

from connector_core.domain.models import EhrVendor, TenantConfig
from connector_core.errors import ConflictError
from devtools.sandbox import seed
from devtools.sandbox.ehr import EhrProfile
from tests.e2e.launch.helpers import (
    Landing,
    drop_config,
    is_entra_picker,
    own_config,
    pick_account,
    set_mapping,
)
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow

PEOPLE = {person.person_id: person for person in seed.group_visit_people()}
FIRST, SECOND = (seed.APPOINTMENTS[a] for a in seed.GROUP_APPOINTMENT_IDS)
STAFF_FIRST = [
    seed.INTERPRETER_ID,
    seed.GROUP_CO_CLINICIAN_ID,
    FIRST.practitioner_id,
    FIRST.patient_id,
    SECOND.patient_id,
]
PATIENT_FIRST = [
    SECOND.patient_id,
    seed.GROUP_CO_CLINICIAN_ID,
    FIRST.patient_id,
    seed.INTERPRETER_ID,
    FIRST.practitioner_id,
]


@pytest.fixture
def epic_config(fresh_stack: Stack) -> Iterator[tuple[EhrProfile, TenantConfig]]:
    profile = fresh_stack.sandbox.ehr.profile("epic")

    def create() -> TenantConfig:
        return fresh_stack.create_approved_config(
            fhir_base_url=profile.fhir_base, vendor=EhrVendor.EPIC
        )

    try:
        config = create()
    except ConflictError as conflict:  # a leftover of an earlier test with the same URL
        fresh_stack.container().configs.delete(
            fresh_stack.tenant(0).tid, str(conflict.extra["existingId"])
        )
        config = create()
    try:
        yield profile, config
    finally:
        fresh_stack.container().configs.delete(config.tenant_id, config.id)


def _launch(
    stack: Stack, browser: Browser, profile: EhrProfile, config: TenantConfig, person_id: str
) -> httpx.Response:
    person = PEOPLE[person_id]
    url = profile.launch_url(
        config.id,
        appointment_id=person.appointment_id,
        user=person.user,
        practitioner_id=person.practitioner_id,
    )
    assert f"sessionId={seed.CONFERENCE_ID}" in url  # as the group-visit record sends it
    response = browser.get(url)
    if is_entra_picker(response):  # this clinician's first launch from this EHR
        assert person.practitioner_id is not None
        upn = stack.sandbox.entra.user_for_practitioner(person.practitioner_id).upn
        response = pick_account(browser, response, upn)
    return response


@pytest.mark.parametrize(
    "order", [STAFF_FIRST, PATIENT_FIRST], ids=["staff-first", "patient-first"]
)
def test_two_clinicians_an_interpreter_and_two_patients_reach_one_meeting(
    fresh_stack: Stack, epic_config: tuple[EhrProfile, TenantConfig], order: list[str]
) -> None:
    s = fresh_stack
    profile, config = epic_config
    browsers = {person: s.browser() for person in order}
    waiting: list[str] = []
    meetings: dict[str, str] = {}
    try:
        for person in order:
            response = _launch(s, browsers[person], profile, config, person)
            landing = Landing(response)
            if landing.meeting_id is None:
                # only a patient who came before any clinician waits
                assert PEOPLE[person].user == "patient" and not meetings, response.text[:600]
                assert "will start soon" in response.text
                waiting.append(person)
                continue
            meetings[person] = landing.meeting_id
            expected_mode = "guest" if PEOPLE[person].user == "patient" else "all"
            assert landing.mode == expected_mode, (person, landing.mode)
        for person in waiting:  # the waiting page moves on once a clinician opened the visit
            moved = Landing(browsers[person].get(f"{s.api}/launch/wait"))
            assert moved.meeting_id, moved.response.text[:600]
            meetings[person] = moved.meeting_id
        assert set(meetings) == set(order)
        assert len(set(meetings.values())) == 1, meetings
        meeting = s.sandbox.graph.meetings[next(iter(meetings.values()))]
        staff_oids = {
            s.sandbox.entra.user_for_practitioner(p).oid
            for p in order
            if PEOPLE[p].practitioner_id is not None
        }
        assert meeting.organizer_oid in staff_oids  # created by whichever clinician came first
    finally:
        for browser in browsers.values():
            browser.close()


# --- callback pages ----------------------------------------------------------------------------

SOLO = "appt-6b1e0d34"


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


def _to_callback(s: Stack, config: TenantConfig, browser: Browser) -> str:
    """Launch up to the EHR's answer; returns the callback URL (not yet opened)."""
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
    to_ehr = browser.get(url)
    assert to_ehr.status_code == 302
    to_callback = browser.get(to_ehr.headers["location"])
    assert to_callback.status_code == 302
    return str(to_callback.headers["location"])


def _error_page(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text[:800]
    assert response.headers["content-type"].startswith("text/html")
    text = html.unescape(response.text)
    for needle in needles:
        assert needle in text, text
    assert "Reference (correlation id)" in text


def test_reloading_the_callback_after_a_launch_says_already_used(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    set_mapping(s, practitioner, s.sandbox.entra.user_for_practitioner(practitioner).oid)
    browser = s.browser(follow_redirects=False)
    try:
        callback = _to_callback(s, config, browser)
        assert browser.get(callback).status_code == 302  # into the meeting
        reload = browser.get(callback)  # the same page again, in the same browser
        _error_page(
            reload,
            401,
            "was already used",
            "Go back to the EHR and click Start virtual visit again.",
        )
        assert "did not start in this browser" not in reload.text
    finally:
        browser.close()


def test_a_callback_opened_in_another_browser_says_so_and_what_to_do(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    first, other = s.browser(follow_redirects=False), s.browser(follow_redirects=False)
    try:
        callback = _to_callback(s, config, first)
        _error_page(
            other.get(callback),
            401,
            "did not start in this browser",
            "allow cookies",
        )
    finally:
        first.close()
        other.close()
