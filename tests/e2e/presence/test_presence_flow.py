"""Presence end to end: sandbox Graph notifications -> webhook -> queue -> sandbox EHR.

Everything runs for real: a provider launch through the browser creates the meeting and its
subscription (the sandbox Graph validates the webhook), people join and leave on the sandbox
meeting, the sandbox sends encrypted meeting call events to the connector on the local host,
the queue worker (Azurite) writes AuditEvents to the sandbox EHR with a backend services token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from connector_core.domain.models import EhrVendor
from connector_core.domain.scopes import BACKEND_SERVICES_SCOPES, scope_string
from devtools.sandbox import seed
from devtools.sandbox._notify import encrypt_rich_notification
from tests.e2e.presence._flow import APPOINTMENT, LiveVisit, launch_visit, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

APPT = seed.APPOINTMENTS[APPOINTMENT]


@pytest.fixture
def fast_retries(fresh_stack: Stack) -> Iterator[Stack]:
    options = fresh_stack.container().presence.options
    saved = options.retry_delays
    options.retry_delays = (1, 1, 2)
    yield fresh_stack
    options.retry_delays = saved


@pytest.mark.parametrize(
    "token",
    [
        "Validation: Testing client application reachability for subscription Request-Id: "
        "9f2d Nonce: ab+c/d=",
        "a+b c&d=e%f",
    ],
)
@pytest.mark.parametrize("route", ["presence", "presence/lifecycle"])
def test_validation_handshake_decodes_plus_and_spaces(stack: Stack, route: str, token: str) -> None:
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{stack.api}/{route}?validationToken={quote(token, safe='')}",
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == token


def test_subscription_creation_passed_graphs_validation(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    validations = [d for d in fresh_stack.sandbox.graph.deliveries if d.kind == "validation"]
    assert validations and all(d.error is None for d in validations[-2:])
    assert live.subscription().include_resource_data


def test_roster_updates_write_audit_events_with_a_backend_token(fresh_stack: Stack) -> None:
    # An earlier test of the session may have left a backend token in the worker's cache.
    container = fresh_stack.container()
    container.smart.forget_backend_token(
        container.smart.get_configuration(fresh_stack.sandbox.fhir_base),
        client_id=container.settings.smart_client_id,
        scope=scope_string(BACKEND_SERVICES_SCOPES),
    )
    live = launch_visit(fresh_stack)
    doctor = live.join_clinician()
    patient = live.join_patient()
    events = live.wait_audit_events(2)
    assert sorted(e["subtype"][1]["code"] for e in events) == ["connect", "connect"]
    whos = {e["agent"][0]["who"].get("reference") for e in events}
    assert whos == {f"Practitioner/{APPT.practitioner_id}", f"Patient/{APPT.patient_id}"}
    assert all(
        {"reference": f"Appointment/{APPOINTMENT}"} == e["entity"][0]["what"] for e in events
    )
    assert {"grant_type": "client_credentials", "auth": "private_key_jwt"} in (
        fresh_stack.sandbox.ehr.token_requests
    )
    # Each AuditEvent's time is the meeting event's time (not when we processed it).
    notified = {
        d.event["eventDateTime"][:23]
        for d in live.graph.notifications(live.subscription().id)
        if d.event and d.event.get("activeParticipants@joined")
    }
    assert {e["recorded"][:23] for e in events} <= notified

    # The clinician's live view, with the cookie the launch set in their browser.
    view = live.browser.get(f"{fresh_stack.api}/visits/{live.visit_key}/participants?format=json")
    assert view.status_code == 200, view.text
    body = view.json()
    assert sorted(p["role"] for p in body["connected"]) == ["clinician", "patient"]
    page = live.browser.get(f"{fresh_stack.api}/visits/{live.visit_key}/participants")
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-connected="2"' in page.text and 'http-equiv="refresh"' in page.text
    # Without the cookie: refused.
    with httpx.Client(timeout=10) as anonymous:
        denied = anonymous.get(f"{fresh_stack.api}/visits/{live.visit_key}/participants")
    assert denied.status_code == 401

    live.leave(patient)
    live.leave(doctor)
    events = live.wait_audit_events(4)
    assert sorted(e["subtype"][1]["code"] for e in events) == [
        "connect",
        "connect",
        "disconnect",
        "disconnect",
    ]
    wait_for(lambda: live.visit().status.value == "ended", what="the call to end")
    assert {p.status.value for p in live.participants()} == {"left"}


def test_duplicate_delivery_writes_no_duplicates(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    live.graph.duplicate_next(10)
    live.join_clinician()
    live.join_patient()
    live.wait_audit_events(2)
    live.graph.wait_idle()
    wait_for(
        lambda: (
            len(fresh_stack.logs.text().split(f"presence.event.applied visit_key={live.visit_key}"))
            - 1
            >= 6
        ),
        what="every delivered copy to be processed",
    )
    assert len(live.audit_events()) == 2
    assert len(live.ledger()) == 2


def test_reordered_join_and_leave_end_in_the_right_state(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    live.join_clinician()
    live.wait_audit_events(1)
    pid = live.graph.join(live.meeting.id, "guest", display_name="Guest")
    live.graph.reorder_next()  # hold the patient's join; it is sent after the leave
    live.graph.admit(live.meeting.id, pid)
    live.leave(pid)
    live.wait_audit_events(3)
    patient = wait_for(
        lambda: next(
            (
                p
                for p in live.participants()
                if p.role.value == "patient" and p.joined_at is not None
            ),
            None,
        ),
        what="the patient's state",
    )
    assert patient.status.value == "left"
    assert patient.joined_at < patient.left_at
    kinds = sorted(e["subtype"][1]["code"] for e in live.audit_events())
    assert kinds == ["connect", "connect", "disconnect"]
    # The exit really arrived before the join.
    notes = [d for d in live.graph.notifications(live.subscription().id) if d.event]
    order = [
        "join" if d.event.get("activeParticipants@joined") else "exit"
        for d in notes
        if d.event.get("eventType", "").endswith("RosterUpdate")
    ]
    assert order[-2:] == ["exit", "join"]


def _forged_item(live: LiveVisit, *, client_state: str | None, tamper: bool) -> dict[str, object]:
    sub = live.subscription()
    event = {
        "eventType": "Microsoft.Communication.CallRosterUpdate",
        "eventDateTime": "2026-01-01T00:00:00.0000000Z",
        "activeParticipants@joined": [
            {"Id": "intruder", "Identity": {"Guest": {"Id": "intruder", "DisplayName": "X"}}}
        ],
        "activeParticipants@exited": [],
    }
    assert sub.certificate is not None
    content = encrypt_rich_notification(event, sub.certificate, sub.encryption_certificate_id or "")
    if tamper:
        content["dataSignature"] = content["dataSignature"][::-1]
    return {
        "subscriptionId": sub.id,
        "clientState": client_state if client_state is not None else sub.client_state,
        "changeType": "updated",
        "tenantId": sub.tid,
        "resource": live.meeting.resource_id,
        "resourceData": {"id": live.meeting.resource_id},
        "encryptedContent": content,
    }


def test_wrong_client_state_and_bad_signature_write_nothing(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    bad = [
        _forged_item(live, client_state="not-the-secret", tamper=False),
        _forged_item(live, client_state=None, tamper=True),
    ]
    delivery = live.graph.send_raw(live.subscription().id, {"value": bad})
    live.graph.wait_idle()
    assert delivery.status == 202
    logs = fresh_stack.logs.text()
    assert logs.count("presence.notification.dropped") >= 2
    # A real event afterwards is processed; the forged ones never were.
    live.join_clinician()
    live.wait_audit_events(1)
    assert len(live.audit_events()) == 1
    assert [p.role.value for p in live.participants()] == ["clinician"]


def test_epic_config_also_sets_the_connection_status(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack, vendor=EhrVendor.EPIC)
    live.join_patient()
    live.wait_audit_events(1)
    calls = wait_for(lambda: fresh_stack.sandbox.ehr.epic_status_calls, what="Epic call")
    assert calls[-1]["ConnectionStatus"] == "Connected"
    assert calls[-1]["ExternalID"] == APPT.patient_id
    assert calls[-1]["ConferenceID"] == APPOINTMENT


def test_ehr_down_for_a_while_write_backs_arrive_when_it_is_back(fast_retries: Stack) -> None:
    stack = fast_retries
    live = launch_visit(stack)
    stack.sandbox.ehr.set_down(True)
    live.join_clinician()
    wait_for(
        lambda: any(r.attempts >= 1 for r in live.ledger()), what="a failed write-back attempt"
    )
    assert live.audit_events() == []
    stack.sandbox.ehr.set_down(False)
    events = live.wait_audit_events(1)
    assert len(events) == 1
    assert "presence.writeback.retry_scheduled" in stack.logs.text()


def test_privacy_no_names_or_ehr_ids_in_tables_or_logs(stack: Stack) -> None:
    """After the runs above: no seed name or identifier in any table or log line."""
    tables = json.dumps(stack.table_dump(), default=str)
    logs = stack.logs.text()
    for value in seed.SENSITIVE_VALUES:
        assert value not in tables, f"{value!r} found in a table"
        assert value not in logs, f"{value!r} found in the logs"
