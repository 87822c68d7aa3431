"""The meeting's Graph subscription is created by the ``meeting-subscriptions`` queue worker
after the clinician's launch has answered: a throttling or slow Graph never holds the clinician
back, the subscription still comes, once, and a call event Graph sends before the connector
has stored the subscription's record is not lost."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from tests.e2e.launch.helpers import clinician_launch, drop_config, own_config, set_mapping
from tests.e2e.presence._flow import WRITEBACK_SYSTEM, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

SOLO = "appt-6b1e0d34"
PRACTITIONER = seed.APPOINTMENTS[SOLO].practitioner_id


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    oid = fresh_stack.sandbox.entra.user_for_practitioner(PRACTITIONER).oid
    set_mapping(fresh_stack, PRACTITIONER, oid)
    yield created
    drop_config(fresh_stack, created)


def _active(s: Stack, meeting_id: str) -> list[object]:
    return [x for x in s.sandbox.graph.subscriptions_for(meeting_id) if x.active]


def test_throttled_graph_does_not_hold_the_clinician_and_the_subscription_still_comes(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    # Graph throttles every subscription create for a while (429, Retry-After: 1 s): the
    # worker's own in-process retries (4 tries) all fail, then the queue retries later.
    s.sandbox.graph.fail_next("subscriptions", 429, count=5, retry_after=1)
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id
    # The clinician is in the meeting while Graph still refuses the subscription (five refusals
    # with Retry-After take the worker at least 4 s).
    assert _active(s, str(landing.meeting_id)) == []
    active = wait_for(lambda: _active(s, str(landing.meeting_id)), timeout=40, what="subscription")
    time.sleep(0.5)
    assert len(_active(s, str(landing.meeting_id))) == 1
    key = s.container().keyring.keyed_hash("visit", config.id, "appointment", SOLO)
    wait_for(lambda: s.container().visits.get(key).record.subscription_id == active[0].id)  # type: ignore[attr-defined]
    logs = s.logs.text()
    assert "subscription.retry" in logs and "status=429" in logs


def test_an_event_sent_before_the_subscription_record_is_stored_reaches_the_ehr(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    # The clinician joins while Graph is still answering the create, and Graph delivers that
    # roster update before its 201: the connector has no record of the subscription yet.
    key = s.container().keyring.keyed_hash("visit", config.id, "appointment", SOLO)
    s.sandbox.graph.join_during_next_create("organizer", external_id=key)
    before = len(s.sandbox.ehr.audit_events)
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id
    wait_for(lambda: _active(s, str(landing.meeting_id)), timeout=30, what="subscription")
    subscription_ids = {x.id for x in s.sandbox.graph.subscriptions_for(str(landing.meeting_id))}  # type: ignore[attr-defined]
    # (the stand-in lists the subscription before the early join's delivery is queued)
    first = wait_for(
        lambda: next(
            (
                d
                for d in list(s.sandbox.graph.deliveries)
                if d.kind == "notification" and d.subscription_id in subscription_ids
            ),
            None,
        ),
        what="the early notification",
    )
    wait_for(lambda: first.done, what="the early notification's delivery")
    assert first.ok, (first.status, first.response_text)  # accepted (202), not dropped

    def connect_written() -> list[dict[str, object]]:
        events = list(s.sandbox.ehr.audit_events)[before:]
        return [
            e
            for e in events
            if any(
                x.get("what", {}).get("identifier", {}).get("system") == WRITEBACK_SYSTEM  # type: ignore[union-attr]
                for x in e.get("entity", [])  # type: ignore[union-attr]
            )
        ]

    written = wait_for(connect_written, timeout=30, what="the clinician's connect AuditEvent")
    assert written
    assert "presence.subscription_pending_match" in s.logs.text()
    assert "presence.notification.dropped" not in s.logs.text().split("launch.started")[-1]
