"""Usage reports end to end: real launches (clinician and patient, with the launch URL's
departmentId), people joining, waiting in the lobby and leaving on the sandbox Teams meeting,
Graph's encrypted notifications through the webhook and the queue worker, then
``GET /api/reports/visits`` as an auditor (JSON and CSV) and as another tenant."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from connector_core.domain.reports import CSV_COLUMNS
from devtools.sandbox import seed
from devtools.sandbox.entra import ADMIN_ROLE, AUDITOR_ROLE
from tests.e2e.launch.helpers import pick_account
from tests.e2e.presence._flow import wait_for
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow

VISIT_APPOINTMENT = "appt-6b1e0d34"
NO_SHOW_APPOINTMENT = "appt-0c7d5e82"
WAITING_APPOINTMENT = "appt-93af2c6b"
DEPARTMENT = "CARD-7"


def _launch(stack: Stack, browser: Browser, config_id: str, appointment: str, user: str) -> Any:
    """A launch from the sandbox EHR with ``departmentId`` as Epic fills it (%PERFDEPID%)."""
    url = stack.sandbox.ehr.launch_url(config_id, appointment_id=appointment, user=user)
    response = browser.get(f"{url}&departmentId={DEPARTMENT}")
    if "/oauth2/v2.0/authorize" in str(response.url):
        practitioner = seed.APPOINTMENTS[appointment].practitioner_id
        upn = stack.sandbox.entra.user_for_practitioner(practitioner).upn
        response = pick_account(browser, response, upn)
    assert response.status_code == 200, response.text[:500]
    return response


def _meeting(stack: Stack, config_id: str, appointment: str) -> tuple[Any, str]:
    keyring = stack.container().keyring
    visit_key = keyring.keyed_hash("visit", config_id, "appointment", appointment)
    visit = wait_for(lambda: _visit(stack, visit_key), what="the visit record")
    meeting = stack.sandbox.graph.meetings[visit.meeting_id]
    wait_for(
        lambda: [s for s in stack.sandbox.graph.subscriptions_for(meeting.id) if s.active],
        what="the meeting's subscription",
    )
    return meeting, visit_key


def _visit(stack: Stack, visit_key: str) -> Any:
    try:
        return stack.container().visits.get(visit_key).record
    except Exception:
        return None


def _report(stack: Stack, token: str, **params: str) -> httpx.Response:
    today = datetime.now(UTC).date()
    query = {"from": (today - timedelta(days=1)).isoformat(), "to": today.isoformat(), **params}
    with stack.http() as client:
        return client.get(
            "/reports/visits", params=query, headers={"Authorization": f"Bearer {token}"}
        )


def _summary(stack: Stack, visit_key: str, status: str) -> dict[str, Any] | None:
    today = datetime.now(UTC).date()
    for s in stack.container().reports.iter_range(
        stack.tenant(0).tid, today - timedelta(days=1), today
    ):
        if s.visit_key == visit_key and s.status.value == status:
            return s.wire()
    return None


def test_reports_of_real_visits(fresh_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = fresh_stack
    # summaries refresh 30 s after a batch in production; the test need not wait that long
    monkeypatch.setattr(stack.container().presence.options, "summary_delay_seconds", 2)
    existing = stack.container().configs.find_id_by_url(
        stack.tenant(0).tid, "test", stack.sandbox.fhir_base
    )
    if existing is not None:
        stack.container().configs.delete(stack.tenant(0).tid, existing)
    config = stack.create_approved_config()
    graph = stack.sandbox.graph
    patient_name = seed.PATIENTS[seed.APPOINTMENTS[VISIT_APPOINTMENT].patient_id].name

    # 1. A visit: the clinician opens it, the patient launches from MyChart and waits in the
    # lobby until admitted, a colleague joins, everybody leaves.
    clinician = stack.browser()
    _launch(stack, clinician, config.id, VISIT_APPOINTMENT, "clinician")
    meeting, visit_key = _meeting(stack, config.id, VISIT_APPOINTMENT)
    doctor = graph.join(meeting.id, "organizer")
    launched = datetime.now(UTC)
    _launch(stack, stack.browser(), config.id, VISIT_APPOINTMENT, "patient")
    patient = graph.join(meeting.id, "guest", display_name=patient_name)
    time.sleep(2.0)  # the patient waits in the lobby
    graph.admit(meeting.id, patient)
    admitted = datetime.now(UTC)
    colleague = graph.join(meeting.id, "staff")
    graph.admit(meeting.id, colleague)  # only the organizer bypasses the lobby
    time.sleep(1.0)
    for pid in (patient, colleague, doctor):
        graph.leave(meeting.id, pid)
    visit = wait_for(
        lambda: _summary(stack, visit_key, "completed"), timeout=60, what="the visit's summary"
    )

    # 2. A no-show: the clinician opens the meeting, waits, leaves; nobody else comes.
    _launch(stack, stack.browser(), config.id, NO_SHOW_APPOINTMENT, "clinician")
    other, no_show_key = _meeting(stack, config.id, NO_SHOW_APPOINTMENT)
    lonely = graph.join(other.id, "organizer")
    time.sleep(0.5)
    graph.leave(other.id, lonely)
    wait_for(lambda: _summary(stack, no_show_key, "no_show"), timeout=60, what="a no-show")

    # 3. The patient launches first and waits on the waiting page; the clinician opens the
    # visit later; the lobby wait runs from the patient's launch, waiting page included.
    from connector_core.adapters.smart import normalize_fhir_base
    from connector_core.domain.visit_keys import ehr_user_key

    container = stack.container()
    practitioner = seed.APPOINTMENTS[WAITING_APPOINTMENT].practitioner_id
    user_key = ehr_user_key(
        container.keyring,
        normalize_fhir_base(stack.sandbox.fhir_base),
        f"Practitioner/{practitioner}",
    )
    container.mappings.delete(user_key)  # else the patient's launch opens the meeting as them
    container.launch_cache.forget_mapping(user_key)
    patient_browser = stack.browser()
    waiting_since = datetime.now(UTC)
    waiting = _launch(stack, patient_browser, config.id, WAITING_APPOINTMENT, "patient")
    assert "/launch/wait" in waiting.text or "refresh" in waiting.text, waiting.text[:300]
    time.sleep(2.0)
    _launch(stack, stack.browser(), config.id, WAITING_APPOINTMENT, "clinician")
    third, waited_key = _meeting(stack, config.id, WAITING_APPOINTMENT)
    doctor = graph.join(third.id, "organizer")
    polled = patient_browser.get(f"{stack.api}/launch/wait")  # the waiting page asks again
    assert polled.status_code == 200
    guest_id = graph.join(third.id, "guest", display_name="Guest")
    graph.admit(third.id, guest_id)
    admitted_late = datetime.now(UTC)
    time.sleep(0.5)
    graph.leave(third.id, guest_id)
    graph.leave(third.id, doctor)
    waited = wait_for(
        lambda: _summary(stack, waited_key, "completed"), timeout=60, what="the waited visit"
    )
    assert waited["lobbyWaitSeconds"] >= 2  # the waiting page's seconds count
    assert waited["lobbyWaitSeconds"] <= (admitted_late - waiting_since).total_seconds() + 2
    assert waited["departmentId"] == DEPARTMENT

    entra = stack.sandbox.entra
    tid = stack.tenant(0).tid
    auditor = entra.mint_access_token(tid=tid, roles=[AUDITOR_ROLE])
    response = _report(stack, auditor)
    assert response.status_code == 200, response.text
    body = response.json()
    rows = {v["visitKey"]: v for v in body["visits"]}
    visit = rows[visit_key]
    assert visit["configId"] == config.id and visit["environment"] == "test"
    assert visit["departmentId"] == DEPARTMENT
    assert visit["status"] == "completed"
    assert visit["organizerOid"] == meeting.organizer_oid
    assert (visit["attendants"], visit["staffCount"], visit["guestCount"]) == (3, 2, 1)
    started = datetime.fromisoformat(visit["startedAt"])
    ended = datetime.fromisoformat(visit["endedAt"])
    assert abs((started - admitted).total_seconds()) < 3
    assert visit["durationSeconds"] == (ended - started).total_seconds()
    assert visit["durationSeconds"] >= 1
    # From the patient's launch to admission: at least the 2 s in the lobby.
    expected_wait = (admitted - launched).total_seconds()
    assert 2 <= visit["lobbyWaitSeconds"] <= expected_wait + 3
    no_show = rows[no_show_key]
    assert no_show["status"] == "no_show" and no_show["departmentId"] == DEPARTMENT
    assert no_show["startedAt"] is None and no_show["durationSeconds"] is None
    assert (no_show["attendants"], no_show["staffCount"], no_show["guestCount"]) == (1, 1, 0)
    assert no_show["endedAt"] is not None
    assert body["summary"]["visits"] >= 2 and body["summary"]["noShows"] >= 1
    # No names, no EHR ids.
    text = response.text
    for secret in (patient_name, VISIT_APPOINTMENT, "pat-3c9e1f40", "prac-7f3a91c2"):
        assert secret not in text

    # The same rows as CSV (RFC 4180), for an admin, by Accept header.
    admin = entra.mint_access_token(tid=tid, roles=[ADMIN_ROLE])
    with stack.http() as client:
        today = datetime.now(UTC).date()
        csv_response = client.get(
            "/reports/visits",
            params={"from": (today - timedelta(days=1)).isoformat(), "to": today.isoformat()},
            headers={"Authorization": f"Bearer {admin}", "Accept": "text/csv"},
        )
    assert csv_response.status_code == 200
    assert csv_response.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(csv_response.text)))
    assert tuple(parsed[0]) == CSV_COLUMNS
    by_key = {r["visitKey"]: r for r in parsed}
    assert by_key[visit_key]["lobbyWaitSeconds"] == str(visit["lobbyWaitSeconds"])
    assert by_key[no_show_key]["durationSeconds"] == ""

    # Another tenant sees none of it; a user without a role is refused; bad dates are 400.
    fabrikam = stack.tenant(1).tid
    other_tenant = entra.mint_access_token(tid=fabrikam, roles=[AUDITOR_ROLE])
    keys = {v["visitKey"] for v in _report(stack, other_tenant).json()["visits"]}
    assert not keys & {visit_key, no_show_key}
    denied = _report(stack, entra.mint_access_token(tid=tid, roles=[]))
    assert denied.status_code == 403
    assert denied.headers["content-type"].startswith("application/problem+json")
    reversed_range = _report(stack, auditor, **{"from": "2026-02-01", "to": "2026-01-01"})
    assert reversed_range.status_code == 400 and reversed_range.json()["correlationId"]
