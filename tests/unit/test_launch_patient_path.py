"""The patient's launch path: table operations on a warm worker (the visit's join URL cached)
and on one that has not seen the visit (the visit read and the arrival upsert side by side),
the arrival row it leaves, and the department of a visit a patient's launch creates."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest

from connector_core.domain.models import ProviderLanding, utcnow
from connector_core.domain.waiting import PATIENT_ARRIVAL_KEY
from connector_core.errors import StorageUnavailableError
from connector_core.repositories import participant_row, table_name
from connector_core.service.launch import (
    WAIT_COOKIE,
    LaunchCache,
    LaunchRole,
    complete_launch,
    poll_waiting,
    start_launch,
)
from tests.unit.launch_fakes import FHIR, World, make_world, state_of

ARRIVAL_ROW = participant_row(PATIENT_ARRIVAL_KEY)


@pytest.fixture
def world() -> World:
    world = make_world()
    world.map_clinician()
    return world


def as_patient(world: World) -> None:
    world.smart.fhir_user = f"{FHIR}/Patient/pat-secret-1"


def arrival_at(world: World, key: str) -> datetime | None:
    row = world.container.visits.arrival(key)
    return row.lobby_at if row is not None else None


def clinician_opens_the_visit(world: World) -> str:
    """The clinician's launch (which creates the meeting); returns the visit key."""
    world.smart.fhir_user = f"{FHIR}/Practitioner/prac-secret-1"
    world.launch()
    (key,) = {pk for (pk, rk) in _visit_rows(world) if rk == "visit"}
    return key


def _visit_rows(world: World) -> list[tuple[str, str]]:
    table = world.container.store._tables[  # type: ignore[attr-defined]
        table_name(world.container.settings.region, "visits")
    ]
    return list(table)


def test_warm_worker_patient_into_an_existing_meeting_is_two_table_operations(
    world: World,
) -> None:
    key = clinician_opens_the_visit(world)
    join = world.container.visits.get(key).record.join_web_url
    as_patient(world)
    world.launch(LaunchRole.PATIENT)  # warms nothing new: the config was cached already
    before = world.ops
    result = world.launch(LaunchRole.PATIENT)
    # the single-use state and the arrival; the join URL came from this worker's cache
    assert world.ops - before == 2
    assert result.redirect == f"{join}&anon=true"
    assert arrival_at(world, key) is not None


def test_a_worker_that_has_not_seen_the_visit_reads_it_beside_the_arrival(world: World) -> None:
    key = clinician_opens_the_visit(world)
    join = world.container.visits.get(key).record.join_web_url
    as_patient(world)
    world.container.launch_cache.forget_visit(key)  # another worker created the meeting
    before = world.ops
    result = world.launch(LaunchRole.PATIENT)
    assert world.ops - before == 3  # state, visit read, arrival
    assert result.redirect == f"{join}&anon=true"
    # ... and now this worker has seen it
    before = world.ops
    world.launch(LaunchRole.PATIENT)
    assert world.ops - before == 2


class _MeetingPoint:
    """Makes the visit read and the arrival upsert wait for each other: if the launch issued
    them one after the other, the first would wait in vain (BrokenBarrierError)."""

    def __init__(self, inner: Any, visit_key: str) -> None:
        self._inner = inner
        self._key = visit_key
        self.barrier = threading.Barrier(2, timeout=5)
        self.threads: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_entity(self, table: str, partition_key: str, row_key: str) -> Any:
        if partition_key == self._key and row_key == "visit":
            self.threads.add(threading.get_ident())
            self.barrier.wait()
        return self._inner.get_entity(table, partition_key, row_key)

    def upsert_entity(self, table: str, entity: dict[str, Any]) -> str:
        if entity["PartitionKey"] == self._key and entity["RowKey"] == ARRIVAL_ROW:
            self.threads.add(threading.get_ident())
            self.barrier.wait()
        return str(self._inner.upsert_entity(table, entity))


def test_on_a_miss_the_visit_read_and_the_arrival_upsert_are_concurrent(world: World) -> None:
    key = clinician_opens_the_visit(world)
    as_patient(world)
    container = world.container
    container.launch_cache.forget_visit(key)
    meeting_point = _MeetingPoint(container.store, key)
    container.visits._store = meeting_point  # type: ignore[assignment]
    result = world.launch(LaunchRole.PATIENT)
    assert result.redirect and result.redirect.endswith("&anon=true")
    assert not meeting_point.barrier.broken and len(meeting_point.threads) == 2


def test_a_failed_arrival_does_not_keep_the_patient_from_the_meeting(world: World) -> None:
    key = clinician_opens_the_visit(world)
    as_patient(world)
    for forget in (True, False):  # the concurrent path and the cached one
        if forget:
            world.container.launch_cache.forget_visit(key)
        world.container.store.fail_next(  # type: ignore[attr-defined]
            StorageUnavailableError("storage down"), operations=["upsert_entity"]
        )
        result = world.launch(LaunchRole.PATIENT)
        assert result.redirect and result.redirect.endswith("&anon=true")
    assert arrival_at(world, key) is None


def test_the_join_url_comes_from_the_patients_own_visit(world: World) -> None:
    first = clinician_opens_the_visit(world)
    first_join = world.container.visits.get(first).record.join_web_url
    assert first_join and world.container.launch_cache.join_url(first) == first_join
    # Another appointment, its clinician not mapped: the patient waits, never sent to the
    # meeting this worker remembers for the first visit.
    unmap(world)
    world.smart.context["fhirContext"] = [{"reference": "Appointment/another"}]
    as_patient(world)
    other = world.launch(LaunchRole.PATIENT)
    assert other.waiting and other.redirect is None


def test_the_join_url_cache_is_bounded_and_expires() -> None:
    from connector_core.domain.models import Region, Visit

    now = [0.0]
    world = make_world()
    cache = LaunchCache(
        world.container.configs, world.container.mappings, max_visits=3, clock=lambda: now[0]
    )

    def visit(key: str) -> Visit:
        at = utcnow()
        return Visit(
            visit_key=key,
            region=Region.AMERICAS,
            config_id="c",
            tenant_id="t",
            meeting_id="m",
            join_web_url=f"https://teams.example/{key}",
            created_at=at,
            updated_at=at,
        )

    cache.remember_visit(visit("a"))
    assert cache.join_url("a") == "https://teams.example/a" and cache.join_url("b") is None
    now[0] = 599.0
    assert cache.join_url("a") is not None
    now[0] = 600.5
    assert cache.join_url("a") is None  # 10 minutes
    for key in "bcde":
        cache.remember_visit(visit(key))
    assert len(cache._visits._items) <= 3  # type: ignore[attr-defined]
    cache.remember_visit(visit("x").model_copy(update={"join_web_url": None}))
    assert cache.join_url("x") is None  # a visit without its meeting is never remembered


def test_waiting_page_arrival_is_the_launch_time_and_polls_read_no_more(world: World) -> None:
    as_patient(world)
    unmap(world)
    launched = utcnow()
    waiting = world.launch(LaunchRole.PATIENT)
    assert waiting.waiting
    # Its arrival is written already (beside the visit read): no visit row yet.
    (key,) = {pk for (pk, rk) in _visit_rows(world)}
    assert {rk for (pk, rk) in _visit_rows(world)} == {ARRIVAL_ROW}
    at = arrival_at(world, key)
    assert at is not None and launched <= at <= utcnow()
    assert poll_waiting(world.container, cookies=world.jar).waiting
    world.map_clinician()
    assert clinician_opens_the_visit(world) == key
    later = utcnow() + timedelta(minutes=3)
    world.container.clock = lambda: later  # the poll comes later: the launch time is kept
    before = world.ops
    done = poll_waiting(world.container, cookies={WAIT_COOKIE: world.jar[WAIT_COOKIE]})
    assert done.redirect and done.redirect.endswith("&anon=true")
    assert world.ops - before == 1  # the arrival; the join URL is this worker's already
    assert arrival_at(world, key) == at


def unmap(world: World) -> None:
    """The clinician has no mapping (so a patient's launch cannot create the meeting)."""
    table = world.container.store._tables[  # type: ignore[attr-defined]
        table_name(world.container.settings.region, "usermaps")
    ]
    for key in [pk for (pk, _) in table]:
        world.container.mappings.delete(key)
        world.container.launch_cache.forget_mapping(key)


def test_a_visit_a_patients_launch_creates_gets_the_launch_urls_department() -> None:
    world = make_world(landing=ProviderLanding.VISIT_PAGE)
    world.map_clinician()
    as_patient(world)
    started = world.apply(
        start_launch(
            world.container,
            role=LaunchRole.PATIENT,
            config_id=world.config.id,
            iss=FHIR,
            launch="L",
            department_id="DEP-7",
        )
    )
    result = world.apply(
        complete_launch(
            world.container,
            query={"state": state_of(started), "code": "c", "iss": "https://ehr.example/oauth2"},
            cookies=world.jar,
        )
    )
    assert result.redirect and result.redirect.endswith("&anon=true")  # created as the clinician
    ((key, _),) = [(pk, rk) for (pk, rk) in _visit_rows(world) if rk == "visit"]
    assert world.container.visits.get(key).record.department_id == "DEP-7"
    assert world.container.visits.arrival(key) is not None
