"""SMART Backend Services write-back against oidc-provider: client_credentials with a
private_key_jwt (RS384) assertion, then ``POST AuditEvent`` with that token at the FHIR API."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from connector_core.adapters.ehr_writeback import (
    CONNECTOR_OBSERVER,
    WritebackContext,
    build_audit_event,
)
from connector_core.domain.models import ParticipantRole, TenantConfig
from connector_core.domain.presence import TransitionKind, WritebackStatus
from connector_core.domain.scopes import BACKEND_SERVICES_SCOPES, scope_string
from devtools.conformance import ConformanceServer
from devtools.sandbox import seed
from tests.conformance.conftest import SOLO, practitioner_of, set_mapping
from tests.e2e.launch.helpers import Landing
from tests.stack import Stack

pytestmark = pytest.mark.slow

T = TypeVar("T")
WRITEBACK_SYSTEM = "urn:ehr-virtual-visit:writeback"


def _wait(check: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_writer_gets_a_backend_token_and_the_audit_event_lands(
    fresh_stack: Stack, cs: ConformanceServer
) -> None:
    container = fresh_stack.container()
    client_id = container.settings.smart_client_id
    appointment = seed.APPOINTMENTS[SOLO]
    writer = container.ehr_writer
    token = writer.backend_token(
        cs.fhir_base, client_id=client_id, scope=scope_string(BACKEND_SERVICES_SCOPES)
    )
    resource = build_audit_event(
        transition=TransitionKind.CONNECT,
        role=ParticipantRole.CLINICIAN,
        participant_key="participant-conformance",
        at=datetime.now(UTC),
        context=WritebackContext(
            patient_id=appointment.patient_id,
            practitioner_id=appointment.practitioner_id,
            appointment_id=appointment.id,
            encounter_id=appointment.encounter_id,
        ),
        writeback_key="wb-conformance-1",
        site="conformance",
    )
    writer.post_audit_event(cs.fhir_base, resource, token=token)

    grants = [r for r in cs.token_requests() if r["grantType"] == "client_credentials"]
    assert grants and grants[-1]["status"] == 200, cs.token_requests()
    assert grants[-1]["authMethod"] == "private_key_jwt" and grants[-1]["clientId"] == client_id
    events = cs.audit_events()
    assert len(events) == 1
    stored = events[0]
    assert stored["clientId"] == client_id
    assert "system/AuditEvent.write" in stored["scope"].split()
    assert stored["resource"]["source"]["observer"]["display"] == CONNECTOR_OBSERVER
    assert {"reference": f"Practitioner/{appointment.practitioner_id}"} in [
        a["who"] for a in stored["resource"]["agent"]
    ]


def test_presence_write_back_reaches_the_certified_server(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    """A real visit: provider launch through oidc-provider, both people join and leave the
    meeting at the Graph stand-in, the queue-driven write-back posts AuditEvents to this FHIR
    server with a backend-services token."""
    s = fresh_stack
    set_mapping(s, cs, practitioner_of(SOLO))
    landing = Landing(
        s.browser().get(cs.launch_url(config.id, appointment_id=SOLO, user="clinician"))
    )
    assert landing.meeting_id, (landing.response.status_code, landing.response.text[:800])
    graph = s.sandbox.graph
    _wait(
        lambda: [x for x in graph.subscriptions_for(landing.meeting_id) if x.active],
        timeout=10,
        what="the meeting's subscription",
    )
    clinician = graph.join(landing.meeting_id, "organizer")
    patient = graph.join(landing.meeting_id, "guest", display_name="Guest")
    graph.admit(landing.meeting_id, patient)

    graph.leave(landing.meeting_id, patient)
    graph.leave(landing.meeting_id, clinician)

    # Connect and disconnect of both, each written once the ledger says so; waiting for all
    # four also leaves no write-back pending for this server once the test ends.
    visit_key = s.container().keyring.keyed_hash("visit", config.id, "appointment", SOLO)

    def written() -> list[dict[str, Any]] | None:
        ledger = [r.record for r in s.container().writebacks.list_for_visit(visit_key)]
        keys = {r.key for r in ledger}
        events = [
            e
            for e in cs.audit_events()
            if any(
                x.get("what", {}).get("identifier", {}).get("system") == WRITEBACK_SYSTEM
                and x["what"]["identifier"].get("value") in keys
                for x in e["resource"].get("entity", [])
            )
        ]
        done = [r for r in ledger if r.status is WritebackStatus.DONE]
        return events if len(events) >= 4 and len(done) >= 4 else None

    events = _wait(written, timeout=20, what="4 AuditEvents at the conformance server")
    whos = [a["who"] for e in events for a in e["resource"]["agent"]]
    assert {"reference": f"Practitioner/{practitioner_of(SOLO)}"} in whos
    assert {"reference": f"Patient/{seed.APPOINTMENTS[SOLO].patient_id}"} in whos
    assert all("system/AuditEvent.write" in e["scope"].split() for e in events)
    subtypes = {c["code"] for e in events for c in e["resource"]["subtype"]}
    assert {"110122", "110123"} <= subtypes  # Login (connect) and Logout (disconnect)
