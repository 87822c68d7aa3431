"""Presence use cases over in-memory fakes: webhook acceptance, queue processing (state, ledger,
retries, poison), lifecycle, renewal and the live view's authorization."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from connector_core.adapters.memory import InMemoryMessageQueue
from connector_core.bootstrap import Container, reset_container, set_container
from connector_core.domain.models import (
    EhrVendor,
    Environment,
    GraphSubscription,
    ParticipantRole,
    ParticipantStatus,
    Region,
    TenantConfig,
    Visit,
    VisitStatus,
)
from connector_core.domain.presence import WritebackStatus
from connector_core.errors import (
    AuthenticationError,
    EhrError,
    GraphError,
    InvalidInputError,
    PermissionDeniedError,
)
from connector_core.service.presence import (
    MAX_BATCH_BYTES,
    POISON_QUEUE,
    PRESENCE_QUEUE,
    GroupCommit,
    PresenceBatch,
    PresenceMessage,
    accept_notifications,
    authorize_viewer,
    participants_view,
    process_message,
    renew_subscriptions,
)
from devtools.sandbox._notify import encrypt_rich_notification
from tests.helpers import in_memory_container

TENANT = "85045508-f5bd-405e-a553-52700f86e29c"
ORGANIZER = "f92ca67f-0564-414b-8caa-8c95b8099928"
STAFF_OID = "0b3e2c1d-0000-4000-8000-000000000002"
VISIT_KEY = "a" * 32
SUB_ID = "7f105c7d-2dc5-4530-97cd-4e7ae6534c07"
SECRET = "s3cret-client+state/=="
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


# --- fakes ----------------------------------------------------------------------------------------


class FakeWriter:
    """Stands in for EhrWriter: records what would reach the EHR; can be made to fail, or to
    reject the token it was given (as a revoked token is: 401, ``reason="token_rejected"``)."""

    def __init__(self) -> None:
        self.audit_events: list[dict[str, Any]] = []
        self.epic_calls: list[dict[str, Any]] = []
        self.tokens: list[tuple[str, str, str]] = []
        self.token_options: list[dict[str, Any]] = []  # allowed_hosts, fresh, per token fetch
        self.used_tokens: list[str] = []  # the token each EHR call carried
        self.fail_audit = 0  # fail the next N AuditEvent posts
        self.fail_epic = 0
        self.reject_audit = 0  # refuse the token of the next N AuditEvent posts
        self.reject_epic = 0
        self.lock = threading.Lock()

    def backend_token(
        self, fhir_base_url: str, *, client_id: str, scope: str, **options: Any
    ) -> str:
        self.tokens.append((fhir_base_url, client_id, scope))
        self.token_options.append(options)
        return f"token-{len(self.tokens)}"

    def _rejected(self) -> EhrError:
        return EhrError("The EHR answered 401 to the call.", ehrStatus=401, reason="token_rejected")

    def post_audit_event(self, fhir_base_url: str, resource: dict[str, Any], *, token: str) -> None:
        with self.lock:
            self.used_tokens.append(token)
            if self.reject_audit:
                self.reject_audit -= 1
                raise self._rejected()
            if self.fail_audit:
                self.fail_audit -= 1
                raise EhrError("The EHR answered 503 to the AuditEvent.", ehrStatus=503)
            self.audit_events.append(resource)

    def set_epic_connection_status(self, fhir_base_url: str, **kw: Any) -> None:
        with self.lock:
            self.used_tokens.append(kw["token"])
            if self.reject_epic:
                self.reject_epic -= 1
                raise self._rejected()
            if self.fail_epic:
                self.fail_epic -= 1
                raise EhrError("The EHR answered 500 to the Epic connection status.")
            self.epic_calls.append(kw)


class FakeGraph:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.created = 0

    def _call(self, name: str, subscription_id: str) -> None:
        self.calls.append((name, subscription_id))
        if name in self.fail:
            raise GraphError(f"Microsoft Graph failed the {name}.")

    def reauthorize_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        self._call("reauthorize", subscription_id)

    def renew_subscription(
        self, *, tenant_id: str, subscription_id: str, expires_at: datetime
    ) -> datetime:
        self._call("renew", subscription_id)
        return expires_at

    def delete_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        self._call("delete", subscription_id)

    def create_subscription(
        self, *, tenant_id: str, join_web_url: str, client_state: str, expires_at: datetime
    ) -> tuple[str, datetime]:
        self.created += 1
        new_id = f"new-sub-{self.created}"
        self._call("create", new_id)
        return new_id, expires_at


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- fixtures -------------------------------------------------------------------------------------


def make_container(*, vendor: EhrVendor = EhrVendor.SMART, context: bool = True) -> Container:
    container = in_memory_container()
    container.clock = Clock(T0)
    container.ehr_writer = FakeWriter()  # type: ignore[assignment]
    container.graph = FakeGraph()  # type: ignore[assignment]
    container.presence.options.retry_delays = (1, 2)
    config = TenantConfig(
        id="cfg-1",
        tenant_id=TENANT,
        region=Region.AMERICAS,
        fhir_base_url="https://ehr.example/api/FHIR/R4",
        approver_upn="analyst@contoso.example",
        environment=Environment.TEST,
        ehr_vendor=vendor,
        created_at=T0,
        created_by="admin",
        updated_at=T0,
    )
    container.configs.add(config)
    sealed = None
    if context:
        sealed = container.keyring.seal(
            "visit-context",
            {
                "fhir_base_url": config.fhir_base_url,
                "practitioner": "Practitioner/prac-77",
                "patient": "Patient/pat-42",
                "appointment": "Appointment/appt-9",
                "encounter": "Encounter/enc-5",
                "conference_id": None,
            },
        )
    container.visits.create(
        Visit(
            visit_key=VISIT_KEY,
            region=Region.AMERICAS,
            config_id=config.id,
            tenant_id=TENANT,
            meeting_id="m1",
            join_web_url="https://teams.example/l/meetup-join/x",
            organizer_oid=ORGANIZER,
            subscription_id=SUB_ID,
            subscription_expires_at=T0 + timedelta(days=2),
            sealed_context=sealed,
            created_at=T0,
            updated_at=T0,
        )
    )
    container.subscriptions.upsert(
        GraphSubscription(
            subscription_id=SUB_ID,
            region=Region.AMERICAS,
            visit_key=VISIT_KEY,
            tenant_id=TENANT,
            client_state_sealed=container.keyring.seal("client-state", {"clientState": SECRET}),
            expires_at=T0 + timedelta(days=2),
            created_at=T0,
        )
    )
    return container


@pytest.fixture
def container() -> Iterator[Container]:
    c = make_container()
    set_container(c)
    yield c
    reset_container()


def cert_of(container: Container) -> x509.Certificate:
    pem = container.settings.graph_notification_cert.get_secret_value()
    return x509.load_pem_x509_certificate(pem.encode())


def user(pid: str, oid: str) -> dict[str, Any]:
    return {
        "id": pid,
        "identity": {"User": {"Id": oid, "DisplayName": "Dr Name", "TenantId": TENANT}},
    }


def guest(pid: str) -> dict[str, Any]:
    return {"id": pid, "identity": {"Guest": {"Id": pid, "DisplayName": "Patient Name"}}}


def roster_event(
    seconds: float,
    joined: list[dict[str, Any]] = (),
    exited: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    at = T0 + timedelta(seconds=seconds)
    return {
        "@odata.type": "#Microsoft.Graph.onlineMeeting",
        "id": "communications/onlineMeetings?$filter=joinWebUrl+eq+'x'",
        "eventType": "Microsoft.Communication.CallRosterUpdate",
        "eventDateTime": at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
        "activeParticipants@joined": list(joined),
        "activeParticipants@exited": list(exited),
    }


def item(
    container: Container, event: dict[str, Any], *, secret: str = SECRET, encrypted: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subscriptionId": SUB_ID,
        "clientState": secret,
        "changeType": "updated",
        "tenantId": TENANT,
        "resource": event.get("id", "x"),
        "resourceData": {"@odata.type": "#microsoft.graph.onlineMeeting", "id": "x"},
    }
    if encrypted:
        body["encryptedContent"] = encrypt_rich_notification(event, cert_of(container), "c1")
    else:
        body["resourceData"].update(event)
    return body


def queued(container: Container, name: str = PRESENCE_QUEUE) -> list[str]:
    queue = container.queue
    assert isinstance(queue, InMemoryMessageQueue)
    return list(queue.queues[name])


def drain(container: Container, *, rounds: int = 20) -> int:
    """Process presence-events until empty (retries included); returns messages processed."""
    queue = container.queue
    assert isinstance(queue, InMemoryMessageQueue)
    processed = 0
    for _ in range(rounds):
        if not queue.queues[PRESENCE_QUEUE]:
            break
        body = queue.queues[PRESENCE_QUEUE].popleft()
        process_message(container, body)
        processed += 1
    return processed


def writer(container: Container) -> FakeWriter:
    w = container.ehr_writer
    assert isinstance(w, FakeWriter)
    return w


def fake_graph(container: Container) -> FakeGraph:
    g = container.graph
    assert isinstance(g, FakeGraph)
    return g


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


def test_group_commit_splits_what_does_not_fit_one_message(container: Container) -> None:
    slow = SlowQueue(delay=0)
    container.queue = slow
    payload = "x" * (MAX_BATCH_BYTES // 3)
    GroupCommit().send(container, [payload] * 7)
    assert slow.calls == 4  # two per message
    assert all(len(b) < 48 * 1024 for b in slow.queues[PRESENCE_QUEUE])


# --- queue processing -----------------------------------------------------------------------------


def deliver(container: Container, *events: dict[str, Any]) -> None:
    accept_notifications(container, {"value": [item(container, e) for e in events]})
    drain(container)


def test_roster_update_writes_audit_events_and_state(container: Container) -> None:
    deliver(
        container,
        {
            "eventType": "Microsoft.Communication.CallStarted",
            "eventDateTime": "2026-03-01T10:00:00Z",
        },
        roster_event(1, joined=[user("p-doc", ORGANIZER)]),
        roster_event(2, joined=[guest("p-pat"), user("p-nurse", STAFF_OID)]),
    )
    events = writer(container).audit_events
    assert len(events) == 3
    whos = sorted(json.dumps(e["agent"][0]["who"]) for e in events)
    assert any("Practitioner/prac-77" in w for w in whos)
    assert any("Patient/pat-42" in w for w in whos)
    assert any("urn:ehr-virtual-visit:participant" in w for w in whos)  # staff: no EHR id
    assert all(e["entity"][0]["what"]["reference"] == "Appointment/appt-9" for e in events)
    assert {e["recorded"][:19] for e in events} == {"2026-03-01T10:00:01", "2026-03-01T10:00:02"}
    assert writer(container).tokens[0][2] == "system/AuditEvent.write"
    visit = container.visits.get(VISIT_KEY).record
    assert visit.status is VisitStatus.LIVE
    roles = {p.role: p.status for p in visit.participants}
    assert roles == {
        ParticipantRole.CLINICIAN: ParticipantStatus.CONNECTED,
        ParticipantRole.PATIENT: ParticipantStatus.CONNECTED,
        ParticipantRole.STAFF: ParticipantStatus.CONNECTED,
    }
    ledger = container.writebacks.list_for_visit(VISIT_KEY)
    assert len(ledger) == 3 and {r.record.status for r in ledger} == {WritebackStatus.DONE}
    assert queued(container) == [] and queued(container, POISON_QUEUE) == []


def test_duplicate_delivery_writes_once(container: Container) -> None:
    event = roster_event(1, joined=[guest("p-pat")])
    deliver(container, event, event)
    deliver(container, event)
    assert len(writer(container).audit_events) == 1


def test_reordered_join_and_leave(container: Container) -> None:
    deliver(
        container,
        roster_event(5, exited=[guest("p-pat")]),
        roster_event(1, joined=[guest("p-pat")]),
    )
    (state,) = container.visits.get(VISIT_KEY).record.participants
    assert state.status is ParticipantStatus.LEFT
    assert state.joined_at == T0 + timedelta(seconds=1)
    assert state.left_at == T0 + timedelta(seconds=5)
    subtypes = sorted(e["subtype"][1]["code"] for e in writer(container).audit_events)
    assert subtypes == ["connect", "disconnect"]


def test_ehr_down_retries_with_backoff_then_succeeds(container: Container) -> None:
    writer(container).fail_audit = 2
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    queue = container.queue
    assert isinstance(queue, InMemoryMessageQueue)
    sent: list[int | None] = []
    original = queue.send_message

    def spy(name: str, body: str, *, visibility_timeout: int | None = None) -> None:
        sent.append(visibility_timeout)
        original(name, body, visibility_timeout=visibility_timeout)

    queue.send_message = spy  # type: ignore[method-assign]
    drain(container)
    assert sent == [1, 2]  # the configured backoff
    assert len(writer(container).audit_events) == 1
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.DONE and record.record.attempts == 3


def test_ehr_down_for_good_ends_in_poison_and_replay_completes(container: Container) -> None:
    writer(container).fail_audit = 100
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    drain(container)
    assert writer(container).audit_events == []
    (poisoned,) = queued(container, POISON_QUEUE)
    assert PresenceMessage.model_validate_json(poisoned).attempt == 3
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.PENDING and record.record.lease_id is None
    # The operator replays it once the EHR is back.
    writer(container).fail_audit = 0
    process_message(container, poisoned)
    assert len(writer(container).audit_events) == 1


def test_write_back_leased_by_another_worker_is_looked_at_again(container: Container) -> None:
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    body = queued(container)[0]
    # Another worker took the lease and then died: our copy must not drop the write-back.
    from connector_core.service import presence as service

    message = PresenceMessage.model_validate_json(body)
    assert message.event is not None
    visit = container.visits.get(VISIT_KEY).record
    transition = service.transitions_of(message.event, clinician_user_key=None)[0]
    other = service.uuid.uuid4().hex
    original = service._perform
    service._perform = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash"))  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError):
            service._write_back(container, visit, transition, other)
    finally:
        service._perform = original  # type: ignore[assignment]
    queue = container.queue
    assert isinstance(queue, InMemoryMessageQueue)
    queue.queues[PRESENCE_QUEUE].clear()
    delays: list[int | None] = []
    queue.send_message = lambda n, b, *, visibility_timeout=None: delays.append(visibility_timeout)  # type: ignore[method-assign]
    process_message(container, body)
    assert writer(container).audit_events == [] and delays == [61]
    container.clock.now = T0 + timedelta(seconds=61)  # type: ignore[attr-defined]
    process_message(container, body)
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


def test_rejected_token_is_replaced_once_at_once(container: Container) -> None:
    w = writer(container)
    w.reject_audit = 1  # revoked before its expiry
    accept_notifications(
        container, {"value": [item(container, roster_event(1, joined=[guest("p")]))]}
    )
    assert drain(container) == 1  # no queue retry: the second try was immediate
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
    queue = container.queue
    assert isinstance(queue, InMemoryMessageQueue)
    process_message(container, queue.queues[PRESENCE_QUEUE].popleft())
    assert w.audit_events == []
    assert [o.get("fresh", False) for o in w.token_options] == [False, True]  # one retry only
    assert len(w.used_tokens) == 2
    (record,) = container.writebacks.list_for_visit(VISIT_KEY)
    assert record.record.status is WritebackStatus.PENDING
    assert len(queue.queues[PRESENCE_QUEUE]) == 1  # back through the queue, as any failure
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


def test_malformed_message_goes_to_poison(container: Container) -> None:
    process_message(container, "{not json")
    assert queued(container, POISON_QUEUE) == ["{not json"]


def test_concurrent_duplicates_write_once() -> None:
    from connector_core.adapters.memory import InMemoryEntityStore

    container = make_container()
    assert isinstance(container.store, InMemoryEntityStore)
    event = roster_event(1, joined=[guest("p1"), guest("p2"), user("d", ORGANIZER)])
    for _ in range(6):
        accept_notifications(container, {"value": [item(container, event)]})
    bodies = queued(container)
    container.queue.queues[PRESENCE_QUEUE].clear()  # type: ignore[attr-defined]
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
    drain(container)  # any "look again" messages
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
