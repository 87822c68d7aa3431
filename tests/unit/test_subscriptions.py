"""The meeting's Graph subscription, created by the queue worker: notifications that arrive
before its record is stored are still accepted (the pending record), and nothing else is."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from connector_core.bootstrap import Container
from connector_core.service.presence import MAX_PENDING_LOOKUPS, accept_notifications
from connector_core.service.subscriptions import (
    SUBSCRIPTION_QUEUE,
    create_subscription_record,
    process_subscription_message,
    request_subscription,
    resolve_pending,
)
from tests.unit.presence_fakes import (
    PRESENCE_QUEUE,
    TENANT,
    VISIT_KEY,
    container_fixture,  # noqa: F401 (the "container" fixture)
    guest,
    item,
    roster_event,
)


class EarlyNotifyingGraph:
    """Graph that notifies the webhook while it is still answering the create (as Microsoft
    Graph may: the first call event can beat the connector's write of the record)."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.results: list[Any] = []
        self.created = 0

    def create_subscription(
        self, *, tenant_id: str, join_web_url: str, client_state: str, expires_at: datetime
    ) -> tuple[str, datetime]:
        self.created += 1
        sub_id = f"early-sub-{self.created}"
        notification = item(self.container, roster_event(1, joined=[guest("p-1")]))
        notification.update({"subscriptionId": sub_id, "clientState": client_state})
        self.results.append(accept_notifications(self.container, {"value": [notification]}))
        # and a second one, now with the subscription id cached from the first
        self.results.append(accept_notifications(self.container, {"value": [notification]}))
        return sub_id, expires_at


def _queued(container: Container, queue: str) -> list[str]:
    return list(container.queue.queues[queue])  # type: ignore[attr-defined]


def test_notifications_before_the_record_is_stored_are_accepted(container: Container) -> None:
    graph = EarlyNotifyingGraph(container)
    container.graph = graph  # type: ignore[assignment]
    before = len(_queued(container, PRESENCE_QUEUE))
    sub_id, _ = create_subscription_record(
        container, visit_key=VISIT_KEY, tenant_id=TENANT, join_web_url="https://t/x"
    )
    assert [(r.enqueued, r.dropped) for r in graph.results] == [(1, 0), (1, 0)]
    queued = _queued(container, PRESENCE_QUEUE)[before:]
    assert len(queued) == 2 and all(VISIT_KEY in body and sub_id in body for body in queued)
    # the final record answers from now on; the pending record is gone
    assert container.subscriptions.get(sub_id).record.visit_key == VISIT_KEY
    pending_id = _pending_ids(container)
    assert pending_id == []


def _pending_ids(container: Container) -> list[str]:
    dump = container.store.dump()  # type: ignore[attr-defined]
    return [
        str(row["PartitionKey"])
        for rows in dump.values()
        for row in rows
        if str(row.get("PartitionKey", "")).startswith("pending-")
    ]


def test_a_forged_client_state_naming_a_pending_subscription_is_refused(
    container: Container,
) -> None:
    secrets: list[str] = []

    class Capturing(EarlyNotifyingGraph):
        def create_subscription(self, **kwargs: Any) -> tuple[str, datetime]:
            state = kwargs["client_state"]
            secrets.append(state)
            pending_id = state.split(".", 1)[0]
            forged = item(container, roster_event(1, joined=[guest("p-1")]))
            for wrong in (f"{pending_id}.wrong", f"{pending_id}.{state[20:]}x", pending_id, ""):
                forged.update({"subscriptionId": "forged-id", "clientState": wrong})
                self.results.append(accept_notifications(container, {"value": [forged]}))
            return "real-sub", kwargs["expires_at"]

    graph = Capturing(container)
    container.graph = graph  # type: ignore[assignment]
    create_subscription_record(
        container, visit_key=VISIT_KEY, tenant_id=TENANT, join_web_url="https://t/x"
    )
    assert [(r.enqueued, r.dropped) for r in graph.results] == [(0, 1)] * 4
    assert resolve_pending(container, secrets[0]) is None  # deleted once the record exists


def test_pending_lookups_per_request_are_bounded(container: Container) -> None:
    reads = 0
    original = container.subscriptions.get_pending

    def counting(pending_id: str) -> Any:
        nonlocal reads
        reads += 1
        return original(pending_id)

    container.subscriptions.get_pending = counting  # type: ignore[method-assign]
    forged = []
    for n in range(20):
        body = item(container, roster_event(1, joined=[guest("p-1")]))
        body.update({"subscriptionId": f"unknown-{n}", "clientState": f"{'A' * 15}{n % 10}.x"})
        forged.append(body)
    result = accept_notifications(container, {"value": forged})
    assert (result.enqueued, result.dropped) == (0, 20)
    assert reads == MAX_PENDING_LOOKUPS


def test_the_worker_leaves_a_live_subscription_alone(container: Container) -> None:
    calls: list[str] = []

    class CountingGraph:
        def create_subscription(self, **kwargs: Any) -> tuple[str, datetime]:
            calls.append("create")
            return "another", kwargs["expires_at"]

    container.graph = CountingGraph()  # type: ignore[assignment]
    request_subscription(container, VISIT_KEY, reason="test")  # the visit already has one
    body = container.queue.queues[SUBSCRIPTION_QUEUE].popleft()  # type: ignore[attr-defined]
    process_subscription_message(container, body)
    assert calls == []


def test_a_malformed_message_goes_to_the_poison_queue(container: Container) -> None:
    process_subscription_message(container, "{not json")
    assert _queued(container, "meeting-subscriptions-poison") == ["{not json"]


def test_an_early_notification_never_marks_its_subscription_unknown(container: Container) -> None:
    """The record lookup misses while the record is being written; the pending record answers.
    Nothing about that subscription is remembered as unknown, so a notification racing the
    first one (or one whose pending lookup a busy request could not afford) is not dropped."""
    seen: list[str] = []

    class Recording(EarlyNotifyingGraph):
        def create_subscription(self, **kwargs: Any) -> tuple[str, datetime]:
            state = kwargs["client_state"]
            notification = item(container, roster_event(1, joined=[guest("p-1")]))
            notification.update({"subscriptionId": "early-sub", "clientState": state})
            self.results.append(accept_notifications(container, {"value": [notification]}))
            seen.append("early-sub")
            return "early-sub", kwargs["expires_at"]

    graph = Recording(container)
    container.graph = graph  # type: ignore[assignment]
    create_subscription_record(
        container, visit_key=VISIT_KEY, tenant_id=TENANT, join_web_url="https://t/x"
    )
    assert [(r.enqueued, r.dropped) for r in graph.results] == [(1, 0)]
    assert "early-sub" not in container.presence.unknown
    assert container.presence.known.get("early-sub") is not None


def test_a_pending_shaped_id_left_unlooked_for_budget_is_not_remembered(
    container: Container,
) -> None:
    forged = []
    for n in range(MAX_PENDING_LOOKUPS + 2):
        body = item(container, roster_event(1, joined=[guest("p-1")]))
        body.update({"subscriptionId": f"unknown-{n}", "clientState": f"{'A' * 15}{n % 10}.x"})
        forged.append(body)
    accept_notifications(container, {"value": forged})
    looked_up = {f"unknown-{n}" for n in range(MAX_PENDING_LOOKUPS)}
    assert {k for k in looked_up if k in container.presence.unknown} == looked_up
    assert f"unknown-{MAX_PENDING_LOOKUPS}" not in container.presence.unknown
