"""Exactly once at the EHR, and storage errors that say what happened (issue 12, items 2-3).

The fake EHR answers as a FHIR server: a conditional create finds what an earlier attempt
stored (or, for servers without conditional create, ignores the condition), a search finds an
AuditEvent by its write-back identifier. Faults: an answer lost after the EHR stored the
resource, a worker lost after its POST, a worker slower than its lease, storage refusing or
failing the ledger update.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

import pytest

from connector_core.bootstrap import Container
from connector_core.domain.models import ParticipantRole, ParticipantStatus
from connector_core.domain.presence import WritebackOutcome, WritebackStatus
from connector_core.errors import StorageRejectedError, StorageUnavailableError
from connector_core.service.presence import (
    PresenceBatch,
    PresenceMessage,
    accept_notifications,
    process_message,
)
from tests.unit.presence_fakes import (
    ORGANIZER,
    POISON_QUEUE,
    PRESENCE_QUEUE,
    TENANT,
    VISIT_KEY,
    clock_of,
    container_fixture,  # noqa: F401 (the "container" fixture)
    deliver,
    drain,
    guest,
    item,
    queue_of,
    queued,
    roster_event,
    store_of,
    user,
    writer,
)


def ledger(container: Container) -> list[Any]:
    return [r.record for r in container.writebacks.list_for_visit(VISIT_KEY)]


def enqueue(container: Container, *events: dict[str, Any]) -> str:
    accept_notifications(container, {"value": [item(container, e) for e in events]})
    return queue_of(container).queues[PRESENCE_QUEUE].popleft()


# --- a lost answer, a lost worker ----------------------------------------------------------------


@pytest.mark.parametrize("honours", [True, False], ids=["conditional-create", "ignores-it"])
def test_a_timeout_after_the_ehr_stored_it_makes_no_second_one(
    container: Container, honours: bool
) -> None:
    w = writer(container)
    w.honours_if_none_exist = honours
    w.store_then_timeout = 1  # stored, then the answer is lost
    deliver(container, roster_event(1, joined=[guest("p")]))
    assert len(w.audit_events) == 1
    (record,) = ledger(container)
    assert record.status is WritebackStatus.DONE
    assert record.outcome is WritebackOutcome.RECONCILED  # found by its identifier
    assert len(w.posts) == 1 and len(w.searches) == 1 and record.attempts == 2


def test_without_a_read_scope_the_conditional_create_still_guards_the_retry(
    container: Container,
) -> None:
    w = writer(container)
    w.refuse_search = True
    w.store_then_timeout = 1
    deliver(container, roster_event(1, joined=[guest("p")]))
    assert len(w.audit_events) == 1 and len(w.posts) == 2
    (record,) = ledger(container)
    assert record.outcome is WritebackOutcome.EXISTED


def test_a_worker_lost_after_its_post_is_taken_over_and_reconciled(container: Container) -> None:
    """Leased: an EHR that does not say it honours If-None-Exist (and does not)."""
    w = writer(container)
    w.advertises_conditional_create = False
    w.honours_if_none_exist = False  # only the search can tell

    def killed(key: str) -> None:
        w.after_store = None
        raise RuntimeError("the worker process died")

    w.after_store = killed
    body = enqueue(container, roster_event(1, joined=[guest("p")]))
    with pytest.raises(RuntimeError):
        process_message(container, body)
    # The host redelivers it; the row is still leased by the lost worker: look again later.
    process_message(container, body)
    assert len(w.posts) == 1
    (retry,) = queued(container)
    queue_of(container).queues[PRESENCE_QUEUE].clear()
    clock_of(container).advance(61)
    process_message(container, retry)
    assert len(w.audit_events) == 1 and len(w.posts) == 1
    (record,) = ledger(container)
    assert record.status is WritebackStatus.DONE and record.outcome is WritebackOutcome.RECONCILED


def test_a_worker_whose_lease_ran_out_does_not_post(container: Container) -> None:
    """Leased: worker A's first call outlasts its lease; worker B takes both write-backs over.
    A's conditional POST finds B's resource, and A makes no call for the second write-back."""
    w = writer(container)
    w.advertises_conditional_create = False
    clock = clock_of(container)
    body = enqueue(
        container,
        roster_event(1, joined=[guest("p1")]),
        roster_event(2, joined=[guest("p2")]),
    )

    def slow_first_call(key: str) -> None:
        w.before_store = None
        clock.advance(70)  # the EHR takes longer than the 60 s lease
        process_message(container, body)  # worker B, meanwhile

    w.before_store = slow_first_call
    process_message(container, body)  # worker A
    per_key = Counter(w.posts)
    assert len(w.audit_events) == 2  # one AuditEvent per write-back
    assert sorted(per_key.values()) == [1, 2]  # the second: B only; the first: B, then A's
    assert {r.status for r in ledger(container)} == {WritebackStatus.DONE}
    assert queued(container, POISON_QUEUE) == []


def test_a_slow_batch_renews_its_lease_before_a_call_could_outlast_it(
    container: Container,
) -> None:
    w = writer(container)
    w.advertises_conditional_create = False
    clock = clock_of(container)
    w.before_store = lambda key: clock.advance(40)  # each call takes 40 s of a 60 s lease
    body = enqueue(
        container,
        roster_event(1, joined=[guest("p1")]),
        roster_event(2, joined=[guest("p2")]),
        roster_event(3, joined=[guest("p3")]),
    )
    commits: list[int] = []
    repository = container.visits
    original = repository.commit

    def counting(visit_key: str, groups: Any) -> dict[str, str]:
        commits.append(sum(len(g) for g in groups))
        return original(visit_key, groups)

    repository.commit = counting  # type: ignore[method-assign]
    process_message(container, body)
    assert len(w.audit_events) == 3 and len(w.posts) == 3
    # fold + claim (the visit row: the call is live; 3 participants; 3 ledger rows), two lease
    # renewals (before the 2nd and the 3rd call), the outcomes
    assert commits == [1 + 3 + 3, 2, 1, 3]


def test_conditional_create_needs_no_lease_two_workers_make_one_audit_event(
    container: Container,
) -> None:
    """An EHR that honours If-None-Exist: worker B processes the same events while worker A's
    first call is under way; every write-back reaches the EHR once, and both workers' ledger
    writes end in one row each."""
    w = writer(container)
    body = enqueue(
        container,
        roster_event(1, joined=[guest("p1")]),
        roster_event(2, joined=[guest("p2")]),
    )

    def meanwhile(key: str) -> None:
        w.before_store = None
        process_message(container, body)  # worker B

    w.before_store = meanwhile
    process_message(container, body)  # worker A
    assert len(w.audit_events) == 2
    assert {r.status for r in ledger(container)} == {WritebackStatus.DONE}
    assert {r.lease_id for r in ledger(container)} == {None}
    assert queued(container, POISON_QUEUE) == []


def test_conditional_create_after_a_lost_worker_finds_the_first_post(container: Container) -> None:
    w = writer(container)

    def killed(key: str) -> None:
        w.after_store = None
        raise RuntimeError("the worker process died")

    w.after_store = killed
    body = enqueue(container, roster_event(1, joined=[guest("p")]))
    with pytest.raises(RuntimeError):
        process_message(container, body)
    assert ledger(container) == []  # nothing recorded: the state and ledger commit after the call
    process_message(container, body)  # the host redelivers it
    assert len(w.audit_events) == 1 and len(w.posts) == 2
    (record,) = ledger(container)
    assert record.status is WritebackStatus.DONE and record.outcome is WritebackOutcome.EXISTED
    assert {r.status for r in ledger(container)} == {WritebackStatus.DONE}


# --- the ledger apart from the EHR ----------------------------------------------------------------


def test_a_storage_error_on_the_ledger_update_does_not_call_the_ehr_again(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    w = writer(container)
    down = StorageUnavailableError("Storage is unavailable (503).", status=503, code="ServerBusy")
    w.after_store = lambda key: store_of(container).fail_next(
        down, operations=("submit_transaction",)
    )
    body = enqueue(container, roster_event(1, joined=[guest("p")]))
    w_after = w.after_store
    with caplog.at_level(logging.WARNING, logger="connector.presence"):
        process_message(container, body)
    w.after_store = None
    assert w_after is not None
    assert "presence.ledger.update_failed" in caplog.text
    (retry_body,) = queued(container)
    retry = PresenceMessage.model_validate_json(retry_body)
    assert retry.attempt == 0 and len(retry.confirmed) == 1  # not counted as an EHR failure
    drain(container)
    assert len(w.posts) == 1 and len(w.audit_events) == 1
    (record,) = ledger(container)
    assert record.status is WritebackStatus.DONE and record.lease_id is None


def test_storage_refusing_the_request_poisons_at_once_with_status_and_code(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    writer(container).advertises_conditional_create = False  # the claim comes before any call
    refused = StorageRejectedError(
        "Storage refused the request (400 EntityTooLarge).", status=400, code="EntityTooLarge"
    )
    store_of(container).fail_next(refused, operations=("submit_transaction",))
    body = enqueue(container, roster_event(1, joined=[guest("p")]))
    with caplog.at_level(logging.WARNING, logger="connector.presence"):
        process_message(container, body)  # returns: not retried
    (poisoned,) = queued(container, POISON_QUEUE)
    note = PresenceBatch.model_validate_json(poisoned).poisoned
    assert note is not None
    assert (note.reason, note.status, note.code) == ("storage_rejected", 400, "EntityTooLarge")
    assert queued(container) == [] and writer(container).posts == []
    line = next(
        r.getMessage() for r in caplog.records if "presence.storage.rejected" in r.getMessage()
    )
    assert "error_code=EntityTooLarge" in line and "correlation_id=" in line


def test_passing_storage_errors_raise_for_the_host_and_then_succeed(container: Container) -> None:
    busy = StorageUnavailableError("Storage is unavailable (503).", status=503, code="ServerBusy")
    store_of(container).fail_next(busy, operations=("list_entities",))
    body = enqueue(container, roster_event(1, joined=[guest("p")]))
    with pytest.raises(StorageUnavailableError):
        process_message(container, body)
    assert queued(container, POISON_QUEUE) == []
    process_message(container, body)  # the host's retry
    assert len(writer(container).audit_events) == 1


def test_an_ehr_refusing_the_resource_poisons_at_once(container: Container) -> None:
    writer(container).reject_permanent = 1
    deliver(container, roster_event(1, joined=[guest("p")]))
    (poisoned,) = queued(container, POISON_QUEUE)
    note = PresenceBatch.model_validate_json(poisoned).poisoned
    assert note is not None and (note.reason, note.status) == ("ehr_rejected", 400)
    assert queued(container) == []


def test_a_deleted_configurations_events_are_dropped_with_a_reason(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    container.configs.delete(TENANT, "cfg-1")
    container.launch_cache.forget_config("cfg-1")
    with caplog.at_level(logging.INFO, logger="connector.presence"):
        deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER)]))
    assert "presence.writeback.dropped" in caplog.text and "reason=config_not_found" in caplog.text
    assert queued(container) == [] and queued(container, POISON_QUEUE) == []
    (record,) = ledger(container)
    assert record.status is WritebackStatus.DROPPED
    visit = container.visits.get(VISIT_KEY).record
    (row,) = container.visits.participants(visit)  # the live view still shows who is there
    assert (row.role, row.status) == (ParticipantRole.CLINICIAN, ParticipantStatus.CONNECTED)


# --- the 500-guest meeting -----------------------------------------------------------------------


def test_a_long_group_visit_with_500_guests_loses_no_write_back(container: Container) -> None:
    """One meeting, 500 guests joining and leaving one after another (1000 roster updates),
    delivered in the webhook's small batches and processed by four workers at once: every
    AuditEvent once, a row per participant and per write-back, and no row that grows."""
    events = []
    for n in range(500):
        events.append(roster_event(2 * n, joined=[guest(f"g{n}")]))
        events.append(roster_event(2 * n + 7, exited=[guest(f"g{n}")]))  # overlapping stays
    for start in range(0, len(events), 5):
        accept_notifications(
            container, {"value": [item(container, e) for e in events[start : start + 5]]}
        )
    queue = queue_of(container).queues[PRESENCE_QUEUE]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                body = queue.popleft()
            try:
                process_message(container, body)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    w = writer(container)
    assert len(w.audit_events) == 1000 and len(set(w.posts)) == 1000
    assert max(Counter(w.posts).values()) == 1
    rows = ledger(container)
    assert len(rows) == 1000 and {r.status for r in rows} == {WritebackStatus.DONE}
    visit = container.visits.get(VISIT_KEY).record
    guests = container.visits.participants(visit)
    assert len(guests) == 500 and {p.status for p in guests} == {ParticipantStatus.LEFT}
    assert queued(container, POISON_QUEUE) == []
    largest = max(
        len(entity["Record"])
        for rows_ in store_of(container).dump().values()
        for entity in rows_
        if "Record" in entity
    )
    assert largest < 4096  # the visit row no longer holds everyone who came
