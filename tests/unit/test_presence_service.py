"""Presence use cases over in-memory fakes: webhook acceptance (and the bounded work it does for
unauthenticated input), queue processing (rows, ledger, retries, poison), lifecycle, renewal
and the live view's authorization. Exactly-once and error handling: test_presence_exactly_once."""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest

from connector_core.adapters.memory import InMemoryMessageQueue
from connector_core.bootstrap import Container
from connector_core.domain.models import (
    EhrVendor,
    ParticipantRole,
    ParticipantStatus,
    VisitStatus,
)
from connector_core.domain.presence import WritebackOutcome, WritebackStatus
from connector_core.errors import AuthenticationError, InvalidInputError, PermissionDeniedError
from connector_core.service.presence import (
    MAX_BATCH_BYTES,
    MAX_LOOKUPS,
    GroupCommit,
    PoisonedBody,
    PresenceBatch,
    PresenceMessage,
    accept_notifications,
    authorize_viewer,
    participants_view,
    process_message,
    renew_subscriptions,
)
from connector_core.service.presence.intake import MAX_DROP_LOGS
from tests.unit.presence_fakes import (
    ORGANIZER,
    POISON_QUEUE,
    PRESENCE_QUEUE,
    SECRET,
    STAFF_OID,
    SUB_ID,
    T0,
    TENANT,
    VISIT_KEY,
    add_visit,
    call_event,
    clock_of,
    container_fixture,  # noqa: F401 (the "container" fixture)
    deliver,
    drain,
    fake_graph,
    guest,
    item,
    make_container,
    queue_of,
    queued,
    roster_event,
    store_of,
    user,
    writer,
)


def participants(container: Container) -> dict[ParticipantRole, Any]:
    visit = container.visits.get(VISIT_KEY).record
    return {p.role: p for p in container.visits.participants(visit)}


# --- webhook --------------------------------------------------------------------------------------


def test_encrypted_and_plain_items_are_enqueued_without_names(container: Container) -> None:
    event = roster_event(1, joined=[user("p-doc", ORGANIZER), guest("p-pat")])
    result = accept_notifications(
        container,
        {"value": [item(container, event), item(container, roster_event(2), encrypted=False)]},
    )
    assert (result.enqueued, result.dropped) == (2, 0)
    (body,) = queued(container)  # one request: one queue message
    batch = PresenceBatch.model_validate_json(body)
    assert len(batch.items) == 2
    for secret_value in ("Dr Name", "Patient Name", ORGANIZER, "p-doc", "p-pat", SECRET):
        assert secret_value not in body
    message = batch.items[0]
    assert message.kind == "call" and message.visit_key == VISIT_KEY
    assert message.event is not None and len(message.event.joined) == 2


def test_bad_items_are_dropped_and_the_rest_go_on(container: Container) -> None:
    good = item(container, roster_event(1, joined=[guest("p1")]))
    tampered = item(container, roster_event(2, joined=[guest("p2")]))
    data = bytearray(base64.b64decode(tampered["encryptedContent"]["data"]))
    data[0] ^= 1
    tampered["encryptedContent"]["data"] = base64.b64encode(bytes(data)).decode()
    items = [
        item(container, roster_event(3), secret="wrong"),
        {**good, "subscriptionId": "unknown-sub"},
        {**good, "tenantId": "00000000-0000-0000-0000-000000000000"},
        tampered,
        {**good, "clientState": None},
        "not an object",
        {**good, "encryptedContent": None, "resourceData": {"id": "no event"}},
        item(container, {"eventType": "Microsoft.Communication.CallRosterUpdate"}),
        good,
    ]
    result = accept_notifications(container, {"value": items})
    assert (result.enqueued, result.dropped) == (1, 8)
    (body,) = queued(container)
    assert PresenceMessage.model_validate_json(body).event.joined  # type: ignore[union-attr]


@pytest.mark.parametrize("body", [None, [], {"value": "x"}, {"items": []}])
def test_not_a_notification_collection(container: Container, body: Any) -> None:
    with pytest.raises(InvalidInputError):
        accept_notifications(container, body)


def test_lifecycle_items_are_verified_and_enqueued(container: Container) -> None:
    base = {"subscriptionId": SUB_ID, "tenantId": TENANT, "clientState": SECRET}
    result = accept_notifications(
        container,
        {
            "value": [
                {**base, "lifecycleEvent": "reauthorizationRequired"},
                {**base, "lifecycleEvent": "subscriptionRemoved", "clientState": "nope"},
                {**base, "lifecycleEvent": "somethingElse"},
            ]
        },
    )
    assert (result.enqueued, result.dropped) == (1, 2)
    message = PresenceMessage.model_validate_json(queued(container)[0])
    assert message.kind == "lifecycle" and message.lifecycle_event == "reauthorizationRequired"


def test_subscription_secret_is_cached(container: Container) -> None:
    body = {"value": [item(container, roster_event(1, joined=[guest("p1")]))]}
    accept_notifications(container, body)
    container.subscriptions.delete(SUB_ID)  # cached: still recognised
    assert accept_notifications(container, body).enqueued == 1
    container.presence.forget(SUB_ID)
    assert accept_notifications(container, body).dropped == 1


def _forged(container: Container, count: int) -> dict[str, Any]:
    template = item(container, roster_event(1, joined=[guest("p1")]))
    return {
        "value": [
            {**template, "subscriptionId": str(uuid.uuid4()), "clientState": "guess"}
            for _ in range(count)
        ]
    }


def test_unknown_subscription_ids_cost_a_few_reads_and_one_summary_line(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_of(container)
    forged = _forged(container, 1000)
    before = store.operations
    with caplog.at_level(logging.WARNING, logger="connector.presence"):
        result = accept_notifications(container, forged)
    assert (result.enqueued, result.dropped) == (0, 1000)
    assert store.operations - before == MAX_LOOKUPS  # not 1000 table reads
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == MAX_DROP_LOGS + 1  # a few lines, then one summary
    assert "dropped=1000" in lines[-1] and "lookup_budget:996" in lines[-1]
    # The ids looked up are remembered as unknown: the same POST again costs no read for them.
    again = {"value": forged["value"][:MAX_LOOKUPS]}
    before = store.operations
    assert accept_notifications(container, again).dropped == MAX_LOOKUPS
    assert store.operations == before


def test_a_flood_of_unknown_ids_cannot_evict_a_live_subscription(container: Container) -> None:
    container.presence.options.max_unknown_subscriptions = 50
    container.presence.__post_init__()  # rebuild the caches with the small bound
    real = {"value": [item(container, roster_event(1, joined=[guest("p1")]))]}
    assert accept_notifications(container, real).enqueued == 1  # cached now
    container.subscriptions.delete(SUB_ID)  # from now on only the cache knows it
    for _ in range(10):
        forged = _forged(container, 1000)
        for start in range(0, 1000, MAX_LOOKUPS):  # every id looked up (and remembered)
            accept_notifications(container, {"value": forged["value"][start : start + MAX_LOOKUPS]})
    assert len(container.presence.unknown) <= 50
    assert accept_notifications(container, real).enqueued == 1  # still known


def test_a_verified_item_lifts_the_lookup_budget_for_graphs_own_batches(
    container: Container,
) -> None:
    """A cold instance receiving one Graph batch for many subscriptions drops nothing genuine."""
    subscriptions = []
    for n in range(12):
        visit_key, sub_id, secret = f"{n:02d}" * 16, str(uuid.uuid4()), f"secret-{n}"
        add_visit(container, visit_key, sub_id, secret, sealed=None)
        subscriptions.append((sub_id, secret))
    batch = [item(container, roster_event(1, joined=[guest("p1")]))]  # verified first
    batch += [
        item(container, roster_event(1, joined=[guest("p1")]), subscription_id=s, secret=k)
        for s, k in subscriptions
    ]
    result = accept_notifications(container, {"value": batch})
    assert (result.enqueued, result.dropped) == (13, 0)


class SlowQueue(InMemoryMessageQueue):
    """A queue whose sends take a while (so concurrent requests pile up) or fail."""

    def __init__(self, delay: float = 0.02, fail: bool = False) -> None:
        super().__init__()
        self.delay, self.fail, self.calls = delay, fail, 0

    def send_message(self, queue: str, body: str, *, visibility_timeout: int | None = None) -> None:
        import time

        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            from connector_core.errors import StorageUnavailableError

            raise StorageUnavailableError("Storage is unavailable.")
        super().send_message(queue, body, visibility_timeout=visibility_timeout)


def run_concurrently(container: Container, requests: int) -> list[BaseException | None]:
    results: list[BaseException | None] = [None] * requests
    barrier = threading.Barrier(requests)

    def one(index: int) -> None:
        barrier.wait()
        try:
            event = roster_event(index, joined=[guest(f"p{index}")])
            accept_notifications(container, {"value": [item(container, event)]})
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_group_commit_shares_queue_messages_between_concurrent_requests(
    container: Container,
) -> None:
    slow = SlowQueue()
    container.queue = slow
    assert run_concurrently(container, 24) == [None] * 24
    messages = []
    for body in slow.queues[PRESENCE_QUEUE]:
        raw = json.loads(body)
        messages += raw.get("items", [raw])
    assert len(messages) == 24 and len({m["id"] for m in messages}) == 24
    assert slow.calls < 24  # some requests shared a message
    drain(container, rounds=50)
    assert len(writer(container).audit_events) == 24


def test_group_commit_failure_reaches_every_request_of_the_batch(container: Container) -> None:
    container.queue = SlowQueue(fail=True)
    results = run_concurrently(container, 8)
    assert all(type(r).__name__ == "StorageUnavailableError" for r in results)


class StallingQueue(InMemoryMessageQueue):
    """A queue whose sends hang until released (a storage call that stalls for many seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def send_message(self, queue: str, body: str, *, visibility_timeout: int | None = None) -> None:
        self.release.wait(10)
        super().send_message(queue, body, visibility_timeout=visibility_timeout)


def test_a_stalled_queue_is_a_503_within_the_deadline_and_loses_nothing(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from connector_core.errors import StorageUnavailableError
    from connector_core.service.presence import intake

    monkeypatch.setattr(intake, "ACK_DEADLINE_SECONDS", 0.3)
    stalled = StallingQueue()
    container.queue = stalled
    started = time.monotonic()
    results = run_concurrently(container, 6)  # both send slots stall; the others wait for one
    waited = time.monotonic() - started
    assert all(isinstance(r, StorageUnavailableError) for r in results), results
    assert waited < 2.0  # each answered at its deadline, not when storage gave up
    stalled.release.set()  # storage comes back: what was being written lands
    commit = container.presence.group_commit
    deadline = time.monotonic() + 5
    while commit._inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    landed = [json.loads(b) for b in stalled.queues[PRESENCE_QUEUE]]
    assert landed and commit._inflight == 0
    # Graph delivers them again; the retries go through, and the worker takes each event once.
    assert run_concurrently(container, 6) == [None] * 6
    drain(container, rounds=50)
    assert len(writer(container).audit_events) == 6


def test_group_commit_splits_what_does_not_fit_one_message(container: Container) -> None:
    slow = SlowQueue(delay=0)
    container.queue = slow
    payload = "x" * (MAX_BATCH_BYTES // 3)
    GroupCommit().send(container, [payload] * 7)
    assert slow.calls == 4  # two per message
    assert all(len(b) < 48 * 1024 for b in slow.queues[PRESENCE_QUEUE])


# --- queue processing -----------------------------------------------------------------------------


def test_roster_update_writes_audit_events_and_participant_rows(container: Container) -> None:
    deliver(
        container,
        call_event("CallStarted", 0),
        roster_event(1, joined=[user("p-doc", ORGANIZER)]),
        roster_event(2, joined=[guest("p-pat"), user("p-nurse", STAFF_OID)]),
    )
    w = writer(container)
    events = w.audit_events
    assert len(events) == 3
    whos = sorted(json.dumps(e["agent"][0]["who"]) for e in events)
    assert any("Practitioner/prac-77" in who for who in whos)
    assert any("Patient/pat-42" in who for who in whos)
    assert any("urn:ehr-virtual-visit:participant" in who for who in whos)  # staff: no EHR id
    assert all(e["entity"][0]["what"]["reference"] == "Appointment/appt-9" for e in events)
    assert {e["recorded"][:19] for e in events} == {"2026-03-01T10:00:01", "2026-03-01T10:00:02"}
    assert w.tokens[0][2] == "system/AuditEvent.write"
    assert w.conditional == [True, True, True]  # every create carries If-None-Exist
    visit = container.visits.get(VISIT_KEY).record
    assert visit.status is VisitStatus.LIVE and visit.participants == ()
    rows = participants(container)
    assert {role: p.status for role, p in rows.items()} == {
        ParticipantRole.CLINICIAN: ParticipantStatus.CONNECTED,
        ParticipantRole.PATIENT: ParticipantStatus.CONNECTED,
        ParticipantRole.STAFF: ParticipantStatus.CONNECTED,
    }
    assert rows[ParticipantRole.CLINICIAN].first_joined_at == T0 + timedelta(seconds=1)
    ledger = container.writebacks.list_for_visit(VISIT_KEY)
    assert len(ledger) == 3 and {r.record.status for r in ledger} == {WritebackStatus.DONE}
    assert {r.record.outcome for r in ledger} == {WritebackOutcome.CREATED}
    assert {r.record.lease_id for r in ledger} == {None}
    assert queued(container) == [] and queued(container, POISON_QUEUE) == []


@pytest.mark.parametrize(
    ("conditional", "round_trips"),
    [
        (True, 2),  # read; post; state + ledger outcomes in one transaction
        (False, 3),  # read; state + ledger claims (leased); post; outcomes
    ],
    ids=["conditional-create", "leased"],
)
def test_a_visits_events_commit_in_one_transaction_per_batch(
    container: Container, conditional: bool, round_trips: int
) -> None:
    """Three events of one visit in one message: one read and one transaction for the state and
    the ledger (not four table operations per event)."""
    store = store_of(container)
    writer(container).advertises_conditional_create = conditional
    container.launch_cache.config_record("cfg-1")  # a warm worker: its config is cached
    accept_notifications(
        container,
        {
            "value": [
                item(container, roster_event(1, joined=[user("p-doc", ORGANIZER)])),
                item(container, roster_event(2, joined=[guest("p-pat")])),
                item(container, roster_event(3, exited=[guest("p-pat")])),
            ]
        },
    )
    before = store.operations
    process_message(container, queue_of(container).queues[PRESENCE_QUEUE].popleft())
    assert store.operations - before == round_trips
    # The visit's report summary is refreshed off this path, by a message of its own.
    assert [json.loads(body)["kind"] for body in queued(container)] == ["summary"]
    assert drain(container) == 1
    assert len(writer(container).audit_events) == 3
    assert {r.record.status for r in container.writebacks.list_for_visit(VISIT_KEY)} == {
        WritebackStatus.DONE
    }


def test_duplicate_delivery_writes_once(container: Container) -> None:
    event = roster_event(1, joined=[guest("p-pat")])
    deliver(container, event, event)
    deliver(container, event)
    assert len(writer(container).audit_events) == 1
    assert len(writer(container).posts) == 1  # the ledger, not the EHR, caught the duplicates


def test_reordered_join_and_leave(container: Container) -> None:
    deliver(
        container,
        roster_event(5, exited=[guest("p-pat")]),
        roster_event(1, joined=[guest("p-pat")]),
    )
    state = participants(container)[ParticipantRole.PATIENT]
    assert state.status is ParticipantStatus.LEFT
    assert state.joined_at == T0 + timedelta(seconds=1)
    assert state.left_at == T0 + timedelta(seconds=5)
    assert (state.first_joined_at, state.last_left_at) == (state.joined_at, state.left_at)
    subtypes = [e["subtype"][1]["code"] for e in writer(container).audit_events]
    assert subtypes == ["connect", "disconnect"]  # in the meeting's order, as delivered together


def test_lobby_time_is_kept_for_reports(container: Container) -> None:
    deliver(container, roster_event(1, joined=[guest("p-pat") | {"isInLobby": True}]))
    waiting = participants(container)[ParticipantRole.PATIENT]
    assert waiting.status is ParticipantStatus.LOBBY and waiting.lobby_at == T0 + timedelta(
        seconds=1
    )
    deliver(container, roster_event(31, joined=[guest("p-pat")]))
    admitted = participants(container)[ParticipantRole.PATIENT]
    assert admitted.lobby_seconds == 30.0 and admitted.status is ParticipantStatus.CONNECTED


def test_call_ended_closes_every_open_row_and_a_late_join_arrives_closed(
    container: Container,
) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER), guest("p-pat")]))
    deliver(container, call_event("CallEnded", 9))
    assert {p.status for p in participants(container).values()} == {ParticipantStatus.LEFT}
    assert container.visits.get(VISIT_KEY).record.status is VisitStatus.ENDED
    deliver(container, roster_event(5, joined=[user("p-nurse", STAFF_OID)]))  # late, before end
    staff = participants(container)[ParticipantRole.STAFF]
    assert staff.status is ParticipantStatus.LEFT and staff.left_at == T0 + timedelta(seconds=9)


def test_legacy_participants_kept_in_the_visit_move_into_rows(container: Container) -> None:
    from connector_core.domain.models import ParticipantState

    current = container.visits.get(VISIT_KEY)
    legacy = ParticipantState(
        participant_key="legacy-doc",
        role=ParticipantRole.CLINICIAN,
        status=ParticipantStatus.CONNECTED,
        joined_at=T0,
        last_event_at=T0,
    )
    container.visits.update(
        current.record.model_copy(update={"participants": (legacy,)}), etag=current.etag
    )
    view = participants_view(container, container.visits.get(VISIT_KEY).record)
    assert [p["role"] for p in view["connected"]] == ["clinician"]  # read before migration
    deliver(container, roster_event(1, joined=[guest("p-pat")]))
    visit = container.visits.get(VISIT_KEY).record
    assert visit.participants == ()
    assert {p.participant_key for p in container.visits.participants(visit)} >= {"legacy-doc"}


def test_ehr_down_retries_with_backoff_then_succeeds(container: Container) -> None:
    writer(container).fail_audit = 2
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    queue = queue_of(container)
    sent: list[int | None] = []
    original = queue.send_message

    def spy(name: str, body: str, *, visibility_timeout: int | None = None) -> None:
        if '"kind":"summary"' not in body:  # the report summary's refresh, not a retry
            sent.append(visibility_timeout)
        original(name, body, visibility_timeout=visibility_timeout)

    queue.send_message = spy  # type: ignore[method-assign]
    drain(container)
    assert sent == [1, 2]  # the configured backoff
    assert len(writer(container).audit_events) == 1
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.DONE and record.record.attempts == 3


def test_ehr_down_for_good_ends_in_poison_with_the_reason_and_replay_completes(
    container: Container,
) -> None:
    from devtools.replay_poison import _prepare

    writer(container).fail_audit = 100
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    drain(container)
    assert writer(container).audit_events == []
    (poisoned,) = queued(container, POISON_QUEUE)
    batch = PresenceBatch.model_validate_json(poisoned)
    assert batch.poisoned is not None and batch.poisoned.reason == "retries_exhausted"
    assert batch.poisoned.status == 503 and batch.items[0].attempt == 3
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.PENDING and record.record.lease_id is None
    # The operator replays it once the EHR is back (as devtools.replay_poison puts it back).
    writer(container).fail_audit = 0
    replayed = _prepare(poisoned, reset_attempts=True)
    assert (
        "poisoned" not in replayed
        and PresenceBatch.model_validate_json(replayed).items[0].attempt == 0
    )
    process_message(container, replayed)
    assert len(writer(container).audit_events) == 1


def test_epic_vendor_also_sets_connection_status_once() -> None:
    container = make_container(vendor=EhrVendor.EPIC)
    writer(container).fail_epic = 1
    deliver(
        container,
        roster_event(1, joined=[guest("p-pat")]),
        roster_event(4, exited=[guest("p-pat")]),
    )
    calls = writer(container).epic_calls
    assert sorted(c["connected"] for c in calls) == [False, True]  # the failed one retried
    assert {(c["external_id"], c["conference_id"]) for c in calls} == {("pat-42", "appt-9")}
    # The AuditEvent that succeeded before the Epic failure was not repeated.
    assert len(writer(container).audit_events) == 2
    assert len(writer(container).posts) == 2


def test_rejected_token_is_replaced_once_at_once(container: Container) -> None:
    w = writer(container)
    w.reject_audit = 1  # revoked before its expiry
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    # no queue retry: the second try was immediate (the other message: the report summary)
    assert drain(container) == 2
    assert len(w.audit_events) == 1
    assert [o.get("fresh", False) for o in w.token_options] == [False, True]
    assert w.used_tokens == ["token-1", "token-2"]  # the fresh token carried the retry
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.DONE and record.record.attempts == 1


def test_token_fetch_passes_the_configs_endpoint_allowance(container: Container) -> None:
    current = container.configs.get(TENANT, "cfg-1")
    allowance = ("auth.vendor-cloud.example.net",)
    container.configs.update(
        current.record.model_copy(update={"ehr_endpoint_hosts": allowance}), expected=current
    )
    writer(container).reject_audit = 1
    deliver(container, roster_event(1, joined=[guest("p")]))
    assert [o["allowed_hosts"] for o in writer(container).token_options] == [allowance] * 2


def test_second_token_rejection_fails_normally(container: Container) -> None:
    w = writer(container)
    w.reject_audit = 2
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    queue = queue_of(container)
    process_message(container, queue.queues[PRESENCE_QUEUE].popleft())
    assert w.audit_events == []
    assert [o.get("fresh", False) for o in w.token_options] == [False, True]  # one retry only
    assert len(w.used_tokens) == 2
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.PENDING
    retries = [b for b in queue.queues[PRESENCE_QUEUE] if '"kind":"summary"' not in b]
    assert len(retries) == 1  # back through the queue, as any failure
    drain(container)
    assert len(w.audit_events) == 1


def test_other_ehr_failures_do_not_fetch_a_fresh_token(container: Container) -> None:
    w = writer(container)
    w.fail_audit = 1
    deliver(container, roster_event(1, joined=[guest("p")]))
    assert len(w.audit_events) == 1
    assert not any(o.get("fresh") for o in w.token_options)


def test_rejected_token_on_the_epic_call_is_replaced_too() -> None:
    container = make_container(vendor=EhrVendor.EPIC)
    w = writer(container)
    w.reject_epic = 1
    deliver(container, roster_event(1, joined=[guest("p-pat")]))
    assert len(w.audit_events) == 1 and len(w.epic_calls) == 1
    assert [o.get("fresh", False) for o in w.token_options] == [False, True]
    assert w.epic_calls[0]["token"] == "token-2"


def test_visit_gone_drops_the_event(container: Container) -> None:
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    container.visits.delete(VISIT_KEY)
    drain(container)
    assert writer(container).audit_events == [] and queued(container, POISON_QUEUE) == []


def test_malformed_message_goes_to_poison_with_the_reason(container: Container) -> None:
    process_message(container, "{not json")
    (poisoned,) = queued(container, POISON_QUEUE)
    body = PoisonedBody.model_validate_json(poisoned)
    assert body.raw == "{not json" and body.poisoned.reason == "malformed"


def test_concurrent_duplicates_write_once() -> None:
    container = make_container()
    event = roster_event(1, joined=[guest("p1"), guest("p2"), user("d", ORGANIZER)])
    for _ in range(6):
        accept_notifications(container, {"value": [item(container, event)]})
    bodies = queued(container)
    queue_of(container).queues[PRESENCE_QUEUE].clear()
    errors: list[BaseException] = []

    def run(body: str) -> None:
        try:
            process_message(container, body)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    clock_of(container).advance(61)  # any "look again" messages wait for a lease to end
    drain(container)
    assert len(writer(container).audit_events) == 3


# --- lifecycle and renewal ------------------------------------------------------------------------


def lifecycle(container: Container, event: str) -> None:
    accept_notifications(
        container,
        {
            "value": [
                {
                    "subscriptionId": SUB_ID,
                    "tenantId": TENANT,
                    "clientState": SECRET,
                    "lifecycleEvent": event,
                }
            ]
        },
    )
    drain(container)


def test_reauthorization_required(container: Container) -> None:
    lifecycle(container, "reauthorizationRequired")
    assert fake_graph(container).calls == [("reauthorize", SUB_ID)]
    fake_graph(container).fail = {"reauthorize"}
    lifecycle(container, "reauthorizationRequired")
    assert fake_graph(container).calls[-1] == ("renew", SUB_ID)


def test_subscription_removed_is_recreated_while_live(container: Container) -> None:
    lifecycle(container, "subscriptionRemoved")
    assert ("create", "new-sub-1") in fake_graph(container).calls
    visit = container.visits.get(VISIT_KEY).record
    assert visit.subscription_id == "new-sub-1"
    assert container.subscriptions.list_ids() == ["new-sub-1"]


def test_lifecycle_for_an_ended_visit_retires_the_subscription(container: Container) -> None:
    current = container.visits.get(VISIT_KEY)
    ended = current.record.model_copy(
        update={"status": VisitStatus.ENDED, "ended_at": T0 - timedelta(hours=1)}
    )
    container.visits.update(ended, etag=current.etag)
    lifecycle(container, "subscriptionRemoved")
    assert fake_graph(container).calls == [("delete", SUB_ID)]
    assert container.subscriptions.list_ids() == []


def expiring_soon(container: Container) -> None:
    sub = container.subscriptions.get(SUB_ID).record
    container.subscriptions.upsert(
        sub.model_copy(update={"expires_at": T0 + timedelta(minutes=45)})
    )


def test_timer_renews_expiring_and_retires_ended(container: Container) -> None:
    assert renew_subscriptions(container).renewed == 0  # two days left: nothing to do
    expiring_soon(container)
    container.clock.now = T0 + timedelta(minutes=10)  # type: ignore[attr-defined]
    report = renew_subscriptions(container)
    assert report.renewed == 1 and fake_graph(container).calls == [("renew", SUB_ID)]
    sub = container.subscriptions.get(SUB_ID).record
    assert sub.expires_at > container.clock() + timedelta(days=2)
    assert container.visits.get(VISIT_KEY).record.subscription_expires_at == sub.expires_at
    # The visit ends; half an hour later the timer stops renewing and deletes it.
    current = container.visits.get(VISIT_KEY)
    container.visits.update(
        current.record.model_copy(
            update={"status": VisitStatus.ENDED, "ended_at": container.clock()}
        ),
        etag=current.etag,
    )
    container.clock.now += timedelta(minutes=31)  # type: ignore[attr-defined]
    report = renew_subscriptions(container)
    assert (report.renewed, report.retired) == (0, 1)
    assert fake_graph(container).calls[-1] == ("delete", SUB_ID)
    assert container.subscriptions.list_ids() == []


def test_timer_counts_graph_failures_and_goes_on(container: Container) -> None:
    expiring_soon(container)
    fake_graph(container).fail = {"renew"}
    assert renew_subscriptions(container).failed == 1


# --- live view ------------------------------------------------------------------------------------


def test_view_lists_roles_and_times_only(container: Container) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER), guest("p-pat")]))
    deliver(container, roster_event(3, exited=[guest("p-pat")]))
    view = participants_view(container, container.visits.get(VISIT_KEY).record)
    assert [p["role"] for p in view["connected"]] == ["clinician"]
    assert {p["role"]: p["status"] for p in view["participants"]} == {
        "clinician": "connected",
        "patient": "left",
    }
    assert view["patientWaitingInLobby"] is False
    text = json.dumps(view)
    assert "Name" not in text and ORGANIZER not in text and "pat-42" not in text


def test_view_shows_patient_waiting_in_lobby(container: Container) -> None:
    waiting = guest("p-pat") | {"isInLobby": True}
    deliver(container, roster_event(1, joined=[waiting]))
    view = participants_view(container, container.visits.get(VISIT_KEY).record)
    assert view["patientWaitingInLobby"] is True and view["connected"] == []
    assert writer(container).audit_events == []


def test_viewer_authorization(container: Container) -> None:
    visit = container.visits.get(VISIT_KEY).record
    cookie = container.keyring.seal("visit-cookie", {"visit_key": VISIT_KEY}, ttl_seconds=60)
    authorize_viewer(container, visit, bearer=None, visit_cookie=cookie)
    other = container.keyring.seal("visit-cookie", {"visit_key": "b" * 32}, ttl_seconds=60)
    with pytest.raises(PermissionDeniedError):
        authorize_viewer(container, visit, bearer=None, visit_cookie=other)
    forged = container.keyring.seal("launch-state", {"visit_key": VISIT_KEY})
    with pytest.raises(AuthenticationError):
        authorize_viewer(container, visit, bearer=None, visit_cookie=forged)
    with pytest.raises(AuthenticationError):
        authorize_viewer(container, visit, bearer=None, visit_cookie=None)

    class Tokens:
        def __init__(self, oid: str) -> None:
            self.oid = oid

        def validate(self, token: str) -> dict[str, Any]:
            return {"oid": self.oid, "tid": TENANT}

    container.portal_tokens = Tokens(ORGANIZER.upper())  # type: ignore[assignment]
    authorize_viewer(container, visit, bearer="t", visit_cookie=None)
    container.portal_tokens = Tokens(STAFF_OID)  # type: ignore[assignment]
    with pytest.raises(PermissionDeniedError):
        authorize_viewer(container, visit, bearer="t", visit_cookie=None)


def test_group_commit_sends_at_once_alone_and_lingers_under_load(container: Container) -> None:
    """A request after a quiet moment, with nobody else on the way, is not held back; under a
    burst (others being verified and decrypted, sends moments ago), events share queue
    messages (a message per event costs the worker, and the queue, about as much as the
    event)."""
    import time

    slow = SlowQueue(delay=0.002)
    container.queue = slow
    commit = GroupCommit()
    waits: list[float | None] = []
    wait = commit._cond.wait

    def counting(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return wait(timeout)

    commit._cond.wait = counting  # type: ignore[method-assign]
    from connector_core.service.presence import intake

    for n in range(3):
        commit.send(container, [f'{{"alone":{n}}}'])
        time.sleep(intake.LOAD_WINDOW_SECONDS * 1.5)  # a quiet moment
    assert waits == [] and commit.sends == 3  # nobody on the way: each sent at once

    def request(n: int) -> None:
        with commit.arriving():
            time.sleep(0.003)  # verifying and decrypting
        commit.send(container, [f'{{"n":{n}}}'])

    threads = []
    for n in range(40):
        thread = threading.Thread(target=request, args=(n,))
        threads.append(thread)
        thread.start()
        time.sleep(0.001)  # about 1000 notifications per second
    for thread in threads:
        thread.join()
    assert len(slow.queues[PRESENCE_QUEUE]) == commit.sends
    assert commit.sends - 3 < 20  # events shared messages while others were on their way
    sent = [json.loads(b) for b in slow.queues[PRESENCE_QUEUE]]
    assert sum(len(b.get("items", [b])) for b in sent) == 43
