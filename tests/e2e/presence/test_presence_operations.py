"""Presence operations end to end: poison queue and replay, lifecycle notifications, the
renewal timer (fired through the host's admin endpoint), JWKS key rotation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from connector_core.bootstrap import reset_container
from connector_core.domain.models import VisitStatus
from connector_core.service.presence import POISON_QUEUE
from devtools.dev_secrets import new_rsa_private_key_pem
from devtools.replay_poison import main as replay_main
from devtools.replay_poison import replay_poison
from tests.e2e.presence._flow import launch_visit, peek_all, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture
def fast_retries(fresh_stack: Stack) -> Iterator[Stack]:
    options = fresh_stack.container().presence.options
    saved = options.retry_delays
    options.retry_delays = (1, 1)
    yield fresh_stack
    options.retry_delays = saved


def test_ehr_down_for_good_event_waits_in_poison_until_replayed(
    fast_retries: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = fast_retries
    live = launch_visit(stack)
    stack.sandbox.ehr.set_down(True)
    live.join_clinician()

    def poisoned() -> list[dict[str, Any]]:
        bodies = [json.loads(b) for b in peek_all(stack, POISON_QUEUE)]
        return [
            b
            for b in bodies
            if any(i.get("visit_key") == live.visit_key for i in b.get("items", []))
        ]

    (message,) = wait_for(poisoned, timeout=40, what="the event in the poison queue")
    (event,) = message["items"]
    assert event["attempt"] == 3
    # It says why, in the message itself and in the log.
    assert message["poisoned"]["reason"] == "retries_exhausted"
    assert message["poisoned"]["status"] == 503 and message["poisoned"]["correlation_id"]
    assert live.audit_events() == []
    (record,) = live.ledger()
    assert record.status.value == "pending" and record.attempts == 3
    assert "presence.writeback.poisoned" in stack.logs.text()

    # The operator's command: count first, then replay once the EHR is back.
    assert (
        replay_main(
            [
                "--queue",
                "presence-events",
                "--dry-run",
                "--connection-string",
                stack.azurite.connection_string,
            ]
        )
        == 0
    )
    listed = capsys.readouterr().out
    assert "would move" in listed and "retries_exhausted 503" in listed
    stack.sandbox.ehr.set_down(False)
    result = replay_poison(
        queue="presence-events", connection_string=stack.azurite.connection_string
    )
    assert result.moved >= 1
    events = live.wait_audit_events(1, timeout=30)
    assert len(events) == 1
    assert poisoned() == []


def test_lifecycle_reauthorization_required(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    sub = live.subscription()
    assert sub.reauthorized_at is None
    live.graph.send_lifecycle(sub.id, "reauthorizationRequired")
    wait_for(lambda: sub.reauthorized_at, what="the reauthorize call")
    assert any(
        path.endswith(f"/subscriptions/{sub.id}/reauthorize") and status == 204
        for _, path, status in live.graph.requests
    )


def test_lifecycle_subscription_removed_is_recreated(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    old = live.subscription()
    live.graph.send_lifecycle(old.id, "subscriptionRemoved")
    new = wait_for(
        lambda: next(
            (
                s
                for s in live.graph.subscriptions_for(live.meeting.id)
                if s.active and s.id != old.id
            ),
            None,
        ),
        what="a new subscription",
    )
    wait_for(lambda: live.visit().subscription_id == new.id, what="the visit to name it")
    # Presence keeps working through the new subscription.
    live.join_clinician()
    live.wait_audit_events(1)


def _fire_timer(stack: Stack) -> None:
    with httpx.Client(timeout=10) as client:
        response = client.post(f"{stack.url}/admin/functions/presence_renewal", json={})
    assert response.status_code == 202


def test_timer_renews_live_subscriptions_and_stops_after_the_visit(fresh_stack: Stack) -> None:
    live = launch_visit(fresh_stack)
    container = fresh_stack.container()
    sub = live.subscription()
    record = container.subscriptions.get(sub.id).record
    soon = container.clock() + timedelta(minutes=20)
    container.subscriptions.upsert(record.model_copy(update={"expires_at": soon}))
    _fire_timer(fresh_stack)
    wait_for(lambda: sub.renewals >= 1, what="the renewal at Graph")
    renewed = wait_for(
        lambda: (r := container.subscriptions.get(sub.id).record).expires_at > soon and r,
        what="the record's new expiry",
    )
    assert renewed.expires_at > container.clock() + timedelta(days=2)

    # The visit ended an hour ago: the next run stops renewing and deletes the subscription.
    live.change_visit(status=VisitStatus.ENDED, ended_at=container.clock() - timedelta(hours=1))
    _fire_timer(fresh_stack)
    wait_for(lambda: sub.deleted, what="the subscription to be deleted")
    # Graph's copy goes first, then the connector's record, in the same timer run
    wait_for(lambda: sub.id not in container.subscriptions.list_ids(), what="the record gone")
    assert sub.renewals == 1


def test_jwks_shows_two_keys_during_a_rollover(stack: Stack) -> None:
    current = os.environ["SMART_PRIVATE_KEY"]
    old_kid = stack.container().signing_keys.active_kid
    os.environ["SMART_PRIVATE_KEY"] = new_rsa_private_key_pem() + current
    reset_container()
    try:
        with httpx.Client(timeout=10) as client:
            keys = client.get(f"{stack.api}/.well-known/jwks.json").json()["keys"]
        assert len(keys) == 2
        assert keys[1]["kid"] == old_kid and keys[0]["kid"] != old_kid
        assert {k["alg"] for k in keys} == {"RS384"} and all("d" not in k for k in keys)
    finally:
        os.environ["SMART_PRIVATE_KEY"] = current
        reset_container()
    with httpx.Client(timeout=10) as client:
        keys = client.get(f"{stack.api}/.well-known/jwks.json").json()["keys"]
    assert [k["kid"] for k in keys] == [old_kid]
