"""Launch end to end: sandbox EHR -> connector (local host) -> Entra stand-in -> Graph stand-in,
driven by a browser-like client that follows redirects and keeps cookies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from connector_core.crypto import new_pkce_pair
from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from tests.e2e.launch.helpers import (
    clinician_launch,
    drop_config,
    forget_mapping,
    own_config,
    patient_launch,
    set_mapping,
    subscriptions_when_settled,
)
from tests.stack import Stack

pytestmark = pytest.mark.slow

SOLO = "appt-6b1e0d34"  # prac-7f3a91c2, pat-3c9e1f40, with an encounter
OTHER = "appt-93af2c6b"  # prac-c41d6a05
GROUP_A, GROUP_B = seed.GROUP_APPOINTMENT_IDS  # one conference, prac-2b8e4d17 + interpreter


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    """A config of its own per test (its visits are new), removed afterwards (one config per
    FHIR URL and environment may exist in a tenant)."""
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


@pytest.fixture
def s(fresh_stack: Stack) -> Stack:
    return fresh_stack


def _step(browser: object, url: str) -> httpx.Response:
    return browser.get(url)  # type: ignore[attr-defined,no-any-return]


def _page_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text[:800]
    assert response.headers["content-type"].startswith("text/html")
    text = response.text
    for needle in needles:
        assert needle in text, text
    assert "Reference (correlation id)" in text
    assert "Traceback" not in text


def test_clinician_first_launch_signs_in_second_goes_straight_and_patient_joins(
    s: Stack, config: TenantConfig
) -> None:
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    forget_mapping(s, practitioner)
    browser = s.browser()
    first = clinician_launch(s, browser, config, SOLO, expect_signin=True)
    assert first.host == urlsplit(s.sandbox.graph_url).netloc
    assert first.meeting_id and first.mode == "all"
    meeting = s.sandbox.graph.meetings[first.meeting_id]
    assert meeting.subject == "Virtual visit"
    assert meeting.lobby_bypass == {"scope": "organizer", "isDialInBypassEnabled": False}
    assert meeting.allow_meeting_chat == "limited"
    assert meeting.organizer_oid == s.sandbox.entra.user_for_practitioner(practitioner).oid
    assert "__Host-vv-visit" in browser.cookie_names()

    # the same clinician, another day's browser: no Microsoft sign-in any more
    second = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert second.meeting_id == first.meeting_id

    # the patient from MyChart: no account, straight to the browser-guest join, same meeting
    patient = patient_launch(s, s.browser(), config, SOLO)
    assert patient.meeting_id == first.meeting_id
    assert patient.mode == "guest"
    assert "anon=true" in str(patient.response.url)

    # the meeting's call events are subscribed, once, by the queue worker after the launch
    subscriptions = subscriptions_when_settled(s, first.meeting_id)
    assert len(subscriptions) == 1
    assert subscriptions[0].include_resource_data
    assert subscriptions[0].notification_url == f"{s.url}/api/presence"


def test_group_visit_and_interpreter_share_one_meeting(s: Stack, config: TenantConfig) -> None:
    clinician = seed.APPOINTMENTS[GROUP_A].practitioner_id
    set_mapping(s, clinician, s.sandbox.entra.user_for_practitioner(clinician).oid)
    forget_mapping(s, seed.INTERPRETER_ID)
    first = clinician_launch(s, s.browser(), config, GROUP_A, expect_signin=False)
    other_appointment = clinician_launch(s, s.browser(), config, GROUP_B, expect_signin=False)
    interpreter = clinician_launch(
        s, s.browser(), config, GROUP_B, practitioner_id=seed.INTERPRETER_ID, expect_signin=True
    )
    patient_a = patient_launch(s, s.browser(), config, GROUP_A)
    patient_b = patient_launch(s, s.browser(), config, GROUP_B)
    ids = {
        first.meeting_id,
        other_appointment.meeting_id,
        interpreter.meeting_id,
        patient_a.meeting_id,
        patient_b.meeting_id,
    }
    assert len(ids) == 1 and None not in ids
    assert patient_a.mode == patient_b.mode == "guest"


def test_patient_before_clinician_waits_then_moves_into_the_meeting(
    s: Stack, config: TenantConfig
) -> None:
    practitioner = seed.APPOINTMENTS[OTHER].practitioner_id
    forget_mapping(s, practitioner)
    patient = s.browser()
    waiting = patient_launch(s, patient, config, OTHER)
    assert waiting.response.status_code == 200
    assert 'http-equiv="refresh"' in waiting.response.text
    assert str(waiting.response.url).endswith("/api/launch/callback") or "callback" in str(
        waiting.response.url
    )
    again = patient.get(f"{s.api}/launch/wait")
    assert "will start soon" in again.text
    clinician = clinician_launch(s, s.browser(), config, OTHER, expect_signin=True)
    moved = patient.get(f"{s.api}/launch/wait")
    assert "anon=true" in str(moved.url)
    assert f'data-meeting-id="{clinician.meeting_id}"' in moved.text


def test_patient_first_creates_the_meeting_as_the_mapped_clinician(
    s: Stack, config: TenantConfig
) -> None:
    practitioner = seed.APPOINTMENTS[OTHER].practitioner_id
    set_mapping(s, practitioner, s.sandbox.entra.user_for_practitioner(practitioner).oid)
    patient = patient_launch(s, s.browser(), config, OTHER)
    assert patient.mode == "guest" and patient.meeting_id
    clinician = clinician_launch(s, s.browser(), config, OTHER, expect_signin=False)
    assert clinician.meeting_id == patient.meeting_id


def test_stale_mapping_is_re_established_by_signing_in_again(
    s: Stack, config: TenantConfig
) -> None:
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    set_mapping(s, practitioner, str(uuid.uuid4()))  # an Entra user that no longer exists
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=True)
    assert landing.meeting_id
    assert s.sandbox.graph.meetings[landing.meeting_id].organizer_oid == (
        s.sandbox.entra.user_for_practitioner(practitioner).oid
    )


def _manual_launch(s: Stack, config: TenantConfig) -> tuple[object, httpx.Response]:
    """Launch with a browser that does not follow redirects: returns the 302 to the EHR."""
    browser = s.browser(follow_redirects=False)
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
    response = browser.get(url)
    assert response.status_code == 302
    return browser, response


def test_replayed_state_is_refused(s: Stack, config: TenantConfig) -> None:
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    set_mapping(s, practitioner, s.sandbox.entra.user_for_practitioner(practitioner).oid)
    browser, to_ehr = _manual_launch(s, config)
    cookie = to_ehr.headers["set-cookie"].split(";", 1)[0]
    to_callback = _step(browser, to_ehr.headers["location"])
    callback_url = to_callback.headers["location"]
    done = _step(browser, callback_url)
    assert done.status_code == 302  # into the meeting
    # the same answer again, even with the browser-binding cookie put back
    with httpx.Client() as raw:
        replay = raw.get(callback_url, headers={"cookie": cookie})
    _page_error(replay, 401, "already used", "click Start virtual visit again")


def test_forged_and_tampered_state_is_refused(s: Stack, config: TenantConfig) -> None:
    browser, to_ehr = _manual_launch(s, config)
    state = parse_qs(urlsplit(to_ehr.headers["location"]).query)["state"][0]
    tampered = state[:-2] + ("AA" if state[-2:] != "AA" else "BB")
    for bad in ("forged-state", tampered):
        response = _step(
            browser, f"{s.api}/launch/callback?{urlencode({'code': 'x', 'state': bad})}"
        )
        _page_error(response, 401, "not valid")


def test_state_from_another_browser_is_refused(s: Stack, config: TenantConfig) -> None:
    browser, to_ehr = _manual_launch(s, config)
    to_callback = _step(browser, to_ehr.headers["location"])
    other = s.browser(follow_redirects=False)
    response = other.get(to_callback.headers["location"])
    _page_error(response, 401, "did not start in this browser")


def test_mismatched_iss_is_refused(s: Stack, config: TenantConfig) -> None:
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["iss"] = s.sandbox.ehr.dstu2_base
    response = s.browser().get(urlunsplit(parts._replace(query=urlencode(query))))
    _page_error(response, 403, "does not trust", "EHR analyst")


def test_wrong_pkce_verifier_is_refused_by_the_ehr_and_shown_clearly(
    s: Stack, config: TenantConfig
) -> None:
    browser, to_ehr = _manual_launch(s, config)
    # an attacker swaps the code challenge on the way to the EHR (code injection)
    parts = urlsplit(to_ehr.headers["location"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["code_challenge"] = new_pkce_pair()[1]
    to_callback = _step(browser, urlunsplit(parts._replace(query=urlencode(query))))
    assert to_callback.status_code == 302 and "code=" in to_callback.headers["location"]
    response = _step(browser, to_callback.headers["location"])
    _page_error(response, 401, "invalid_grant", "refused")  # the answer was tampered with


def test_ehr_access_denied_is_a_clear_page(s: Stack, config: TenantConfig) -> None:
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician", deny=True)
    response = s.browser().get(url)
    _page_error(response, 403, "access denied", "allow it")


def test_graph_429_is_retried_then_succeeds(s: Stack, config: TenantConfig) -> None:
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    set_mapping(s, practitioner, s.sandbox.entra.user_for_practitioner(practitioner).oid)
    s.sandbox.graph.fail_next("createOrGet", 429, retry_after=1)
    started = time.monotonic()
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id
    assert time.monotonic() - started >= 1.0  # Retry-After honoured
    statuses = [
        status for method, path, status in s.sandbox.graph.requests if "createOrGet" in path
    ]
    assert statuses[-2] == 429 and statuses[-1] == 201


def test_graph_403_access_policy_tells_the_clinician_and_logs_the_fix(
    s: Stack, config: TenantConfig
) -> None:
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    set_mapping(s, practitioner, s.sandbox.entra.user_for_practitioner(practitioner).oid)
    s.sandbox.graph.set_access_policy(s.tenant(0).tid, False)
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
    response = s.browser().get(url)
    _page_error(response, 403, "application access policy", "administrator")
    logs = s.logs.text()
    assert "graph.access_policy_missing" in logs
    assert "Grant-CsApplicationAccessPolicy" in logs
