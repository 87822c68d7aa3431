"""Presence at scale, end to end: Graph's notifications over real HTTP to the local host, the
queue worker on Azurite, AuditEvents at the sandbox EHR (issue 12's scenarios; the speed goals
are ``make bench``'s, these check that nothing is lost, duplicated or poisoned).

* a long group visit: one meeting, 500 different guests joining and leaving one after another
  (1000 rich roster notifications, at most 32 in flight), the load that used to lose 710
  write-backs once the visit record outgrew Table Storage's limits;
* a burst across many visits;
* a write-back the EHR stored whose answer was lost on the way back (a network fault between
  the connector and the sandbox EHR), with an EHR that honours If-None-Exist and one that
  ignores it: the retry searches first and writes no second AuditEvent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from connector_core.domain.presence import WritebackOutcome, WritebackStatus
from connector_core.service.presence import POISON_QUEUE, lookup_subscription
from devtools.bench_presence import create_visits, roster_notifications
from devtools.sandbox import seed
from tests.e2e.presence._flow import APPOINTMENT, WRITEBACK_SYSTEM, launch_visit, peek_all, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow


def _post_all(stack: Stack, bodies: list[str], *, in_flight: int) -> list[int]:
    """POST every body to the webhook, at most ``in_flight`` at once, over kept-alive
    connections (as Graph does); returns the statuses."""
    with httpx.Client(
        base_url=stack.api,
        timeout=30,
        limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight),
    ) as client:

        def post(body: str) -> int:
            headers = {"Content-Type": "application/json"}
            return client.post("/presence", content=body.encode(), headers=headers).status_code

        with ThreadPoolExecutor(in_flight) as pool:
            return list(pool.map(post, bodies))


def _arrived(stack: Stack, keys: set[str]) -> Counter[str]:
    found: Counter[str] = Counter()
    for event in list(stack.sandbox.ehr.audit_events):
        for entity in event.get("entity", []):
            identifier = entity.get("what", {}).get("identifier", {})
            if identifier.get("system") == WRITEBACK_SYSTEM and identifier.get("value") in keys:
                found[identifier["value"]] += 1
    return found


def _visits(stack: Stack, count: int) -> list[Any]:
    sandbox = stack.sandbox
    tenant = stack.tenant(0)
    organizer = sandbox.entra.user_for_practitioner(seed.APPOINTMENTS[APPOINTMENT].practitioner_id)
    staff = next(u.oid for u in sandbox.entra.users_in(tenant.tid) if u.oid != organizer.oid)
    container = stack.container()
    existing = container.configs.find_id_by_url(tenant.tid, "test", sandbox.fhir_base)
    if existing is not None:
        container.configs.delete(tenant.tid, existing)
    _, visits = create_visits(
        container,
        tenant=tenant.tid,
        organizer=organizer.oid,
        staff=staff,
        fhir_base=sandbox.fhir_base,
        graph_url=sandbox.graph_url,
        count=count,
    )
    for visit in visits:
        lookup_subscription(container, visit.subscription_id)
    return visits


def _poisoned_for(stack: Stack, visit_keys: set[str]) -> list[dict[str, Any]]:
    bodies = [json.loads(b) for b in peek_all(stack, POISON_QUEUE)]
    return [b for b in bodies if any(i.get("visit_key") in visit_keys for i in b.get("items", [b]))]


def test_a_group_visit_with_500_guests_writes_every_audit_event_once(fresh_stack: Stack) -> None:
    stack = fresh_stack
    (visit,) = _visits(stack, 1)
    container = stack.container()
    bodies, keys = roster_notifications(container, [visit], 1000)
    assert _post_all(stack, bodies, in_flight=32) == [202] * 1000
    expected = set(keys)

    def all_arrived() -> Counter[str] | None:
        found = _arrived(stack, expected)
        return found if len(found) == len(expected) else None

    arrived = wait_for(all_arrived, timeout=240, interval=0.5, what="1000 AuditEvents at the EHR")

    def all_done() -> bool:
        rows = [r.record for r in container.writebacks.list_for_visit(visit.visit_key)]
        return len(rows) == 1000 and all(r.status is WritebackStatus.DONE for r in rows)

    wait_for(all_done, timeout=30, what="every ledger row done")
    assert max(_arrived(stack, expected).values()) == 1  # none twice
    assert len(arrived) == 1000
    record = container.visits.get(visit.visit_key).record
    guests = container.visits.participants(record)
    assert len(guests) == 500 and {p.status.value for p in guests} == {"left"}
    assert _poisoned_for(stack, {visit.visit_key}) == []
    # Nothing grew with the guests: the visit's own row is as small as when it was created.
    rows = [r for r in stack.table_dump() if r.get("PartitionKey") == visit.visit_key]
    assert len(rows) == 1 + 500 + 1000
    assert max(len(str(r.get("Record", ""))) for r in rows) < 4096


def test_a_burst_across_many_visits_loses_and_duplicates_nothing(fresh_stack: Stack) -> None:
    stack = fresh_stack
    visits = _visits(stack, 60)
    bodies, keys = roster_notifications(stack.container(), visits, 600)
    assert _post_all(stack, bodies, in_flight=64) == [202] * 600
    expected = set(keys)
    wait_for(
        lambda: len(_arrived(stack, expected)) == len(expected),
        timeout=180,
        interval=0.5,
        what="600 AuditEvents at the EHR",
    )
    assert max(_arrived(stack, expected).values()) == 1
    assert _poisoned_for(stack, {v.visit_key for v in visits}) == []


class _LosesOneAnswer(httpx.BaseTransport):
    """A network fault on the way back: the first AuditEvent POST reaches the EHR (which stores
    it) and its answer never arrives (a read timeout). Everything else passes untouched."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not self.lost and request.method == "POST" and request.url.path.endswith("/AuditEvent"):
            response.read()
            self.lost += 1
            raise httpx.ReadTimeout("the answer was lost on the way back", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def lossy_network(fresh_stack: Stack) -> Iterator[_LosesOneAnswer]:
    container = fresh_stack.container()
    options = container.presence.options
    saved = options.retry_delays
    options.retry_delays = (1, 1, 2)
    http = container.ehr_http
    inner = http._transport
    lossy = _LosesOneAnswer(inner)
    http._transport = lossy
    yield lossy
    http._transport = inner
    fresh_stack.sandbox.ehr.ignore_if_none_exist = False
    container.ehr_writer._capabilities.clear()
    options.retry_delays = saved


@pytest.mark.parametrize("honours", [True, False], ids=["conditional-create", "ignores-it"])
def test_an_answer_lost_after_the_ehr_stored_it_writes_no_second_one(
    fresh_stack: Stack, lossy_network: _LosesOneAnswer, honours: bool
) -> None:
    stack = fresh_stack
    logged_before = len(stack.logs.lines)
    stack.sandbox.ehr.ignore_if_none_exist = not honours
    stack.container().ehr_writer._capabilities.clear()  # read its CapabilityStatement again
    live = launch_visit(stack)
    live.join_patient()
    wait_for(
        lambda: any(r.status is WritebackStatus.DONE for r in live.ledger()),
        timeout=60,
        what="the write-back to be done",
    )
    assert lossy_network.lost == 1
    (record,) = live.ledger()
    # The retry searched the EHR for the write-back's identifier and found the first POST.
    assert record.outcome is WritebackOutcome.RECONCILED and record.attempts == 2
    assert len(live.audit_events()) == 1
    since = "\n".join(stack.logs.lines[logged_before:])
    assert "presence.writeback.reconcile_unavailable" not in since
