"""Helpers for the presence e2e tests: a real provider launch, meeting actions, bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.storage.queue import QueueClient

from connector_core.domain.presence import WritebackStatus
from connector_core.errors import ConcurrencyConflictError
from devtools.sandbox import seed
from devtools.sandbox.graph import Meeting, Subscription
from tests.e2e.launch.helpers import pick_account
from tests.stack import Browser, Stack

T = TypeVar("T")
WRITEBACK_SYSTEM = "urn:ehr-virtual-visit:writeback"
APPOINTMENT = "appt-6b1e0d34"


def wait_for(
    check: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


@dataclass
class LiveVisit:
    stack: Stack
    config_id: str
    visit_key: str
    meeting: Meeting
    browser: Browser  # the clinician's browser (holds the visit cookie)

    @property
    def graph(self) -> Any:
        return self.stack.sandbox.graph

    def subscription(self) -> Subscription:
        subs = [s for s in self.graph.subscriptions_for(self.meeting.id) if s.active]
        assert subs, "the meeting has no active subscription"
        return subs[-1]

    def ledger(self) -> list[Any]:
        return [r.record for r in self.stack.container().writebacks.list_for_visit(self.visit_key)]

    def audit_events(self) -> list[dict[str, Any]]:
        """AuditEvents at the sandbox EHR that belong to this visit (duplicates included)."""
        keys = {r.key for r in self.ledger()}
        found = []
        for event in list(self.stack.sandbox.ehr.audit_events):
            ids = {
                e.get("what", {}).get("identifier", {}).get("value")
                for e in event.get("entity", [])
                if e.get("what", {}).get("identifier", {}).get("system") == WRITEBACK_SYSTEM
            }
            if ids & keys:
                found.append(event)
        return found

    def wait_audit_events(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            events = self.audit_events()
            done = [r for r in self.ledger() if r.status is WritebackStatus.DONE]
            return events if len(events) >= count and len(done) >= count else None

        return wait_for(enough, timeout=timeout, what=f"{count} AuditEvents")

    def visit(self) -> Any:
        return self.stack.container().visits.get(self.visit_key).record

    def change_visit(self, **fields: Any) -> None:
        """Set ``fields`` on the visit row, reading again when a worker or timer of the running
        stack wrote it in between (as the connector's own writers do)."""
        visits = self.stack.container().visits
        for _ in range(10):
            current = visits.get(self.visit_key)
            try:
                visits.update(current.record.model_copy(update=fields), etag=current.etag)
                return
            except ConcurrencyConflictError:
                time.sleep(0.05)
        raise AssertionError("the visit kept changing")

    def participants(self) -> list[Any]:
        """The visit's participant rows (one row each in the visit's partition)."""
        visits = self.stack.container().visits
        return visits.participants(visits.get(self.visit_key).record)

    def join_clinician(self) -> str:
        return str(self.graph.join(self.meeting.id, "organizer"))

    def join_patient(self, *, admit: bool = True) -> str:
        patient = seed.PATIENTS[seed.APPOINTMENTS[APPOINTMENT].patient_id]
        pid = str(self.graph.join(self.meeting.id, "guest", display_name=patient.name))
        if admit:
            self.graph.admit(self.meeting.id, pid)
        return pid

    def leave(self, participant_id: str) -> None:
        self.graph.leave(self.meeting.id, participant_id)


def launch_visit(stack: Stack, *, vendor: Any = None, appointment: str = APPOINTMENT) -> LiveVisit:
    """A provider launch through the browser: SMART EHR launch, Entra sign-in the first time,
    meeting + subscription. Each call uses a new config, hence a new visit and meeting."""
    kwargs = {"vendor": vendor} if vendor is not None else {}
    configs = stack.container().configs
    # One config per tenant + environment + FHIR URL: replace the previous test's.
    existing = configs.find_id_by_url(stack.tenant(0).tid, "test", stack.sandbox.fhir_base)
    if existing is not None:
        configs.delete(stack.tenant(0).tid, existing)
    config = stack.create_approved_config(**kwargs)
    browser = stack.browser()
    ehr = stack.sandbox.ehr
    response = browser.get(ehr.launch_url(config.id, appointment_id=appointment, user="clinician"))
    if "/oauth2/v2.0/authorize" in str(response.url):
        practitioner = seed.APPOINTMENTS[appointment].practitioner_id
        upn = stack.sandbox.entra.user_for_practitioner(practitioner).upn
        response = pick_account(browser, response, upn)
    assert response.status_code == 200, response.text[:500]
    meeting = stack.sandbox.graph.meeting_by_join_url(str(response.url))
    keyring = stack.container().keyring
    visit_key = keyring.keyed_hash("visit", config.id, "appointment", appointment)
    live = LiveVisit(stack, config.id, visit_key, meeting, browser)
    wait_for(
        lambda: [s for s in stack.sandbox.graph.subscriptions_for(meeting.id) if s.active],
        what="the meeting's subscription",
    )
    return live


def queue_client(stack: Stack, name: str) -> QueueClient:
    return QueueClient.from_connection_string(stack.azurite.connection_string, name)


def peek_all(stack: Stack, name: str) -> list[str]:
    """Visible messages of a queue, decoded (base64 as the host writes them)."""
    import base64

    client = queue_client(stack, name)
    try:
        messages = client.peek_messages(max_messages=32)
    except Exception:  # queue not created yet
        return []
    return [base64.b64decode(m.content).decode() for m in messages]
