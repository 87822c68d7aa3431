"""The retention purge against the in-memory store AND a private Azurite (same assertions):
exactly the expired rows of every kind go, counts are logged (and nothing else), a second run
deletes nothing, two instances at once neither fail nor differ, and each run is bounded.

Rows are written now (their ``Timestamp``) and the purge's clock runs ``SHIFT`` ahead, so every
row is old enough to be a candidate and the retention rules alone decide (the filter on the
write time itself has its own tests with a fake store clock, below).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from connector_core.adapters.memory import InMemoryEntityStore, InMemoryMessageQueue
from connector_core.bootstrap import Container
from connector_core.domain.models import (
    EhrUserMapping,
    GraphSubscription,
    ParticipantRole,
    ParticipantStatus,
    Region,
    Visit,
    VisitStatus,
)
from connector_core.domain.presence import ParticipantRecord, TransitionKind, WritebackRecord
from connector_core.domain.waiting import patient_arrival
from connector_core.errors import NotFoundError
from connector_core.ports import EntityStore
from connector_core.repositories import RowWrite, table_name
from connector_core.service.retention import RetentionReport, purge_expired
from devtools.azurite import Azurite
from tests.helpers import make_settings

SHIFT = timedelta(days=400)
REGION = Region.AMERICAS
DELETED = ("visits", "abandoned", "subscriptions", "nonces", "sessions", "mappings")


@pytest.fixture(scope="module")
def private_azurite() -> Iterator[Azurite]:
    # Its own Azurite: the purge deletes whatever is expired in the region's tables, so exact
    # counts need tables no other test writes to.
    with Azurite() as instance:
        yield instance


@pytest.fixture(params=["memory", "azurite"])
def new_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], EntityStore]]:
    """Makes stores over the same data (a second one is a second instance's client)."""
    if request.param == "memory":
        shared = InMemoryEntityStore()
        yield lambda: shared
        return
    from pydantic import SecretStr

    from connector_core.adapters.azure_storage import AzureTableStore
    from connector_core.settings import StorageSettings

    azurite: Azurite = request.getfixturevalue("private_azurite")
    settings = StorageSettings(connection_string=SecretStr(azurite.connection_string))
    first = AzureTableStore(settings)
    _empty_tables(first)
    yield lambda: AzureTableStore(settings)
    _empty_tables(first)


def _empty_tables(store: EntityStore) -> None:
    for kind in ("visits", "subs", "nonces", "portalsessions", "usermaps"):
        table = table_name(REGION, kind)
        while rows := store.scan_entities(table, limit=1000):
            for entity, _ in rows:
                store.delete_entity(table, str(entity["PartitionKey"]), str(entity["RowKey"]))


def _container(store: EntityStore, now: datetime) -> Container:
    return Container(
        settings=make_settings(),
        store=store,
        queue=InMemoryMessageQueue(),
        health_store=store,
        clock=lambda: now,
    )


def _key() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


@dataclass
class Seeded:
    gone: list[tuple[str, str, str]] = field(default_factory=list)  # (table, pk, rk)
    kept: list[tuple[str, str, str]] = field(default_factory=list)


def _visit(key: str, now: datetime, **fields: object) -> Visit:
    values: dict[str, object] = {
        "visit_key": key,
        "region": REGION,
        "config_id": "cfg-retention",
        "tenant_id": "tid",
        "created_at": now - timedelta(days=10),
        "updated_at": now - timedelta(days=10),
        "purge_after": now - timedelta(days=3),
    }
    values.update(fields)
    return Visit.model_validate(values)


def _participant(n: int, at: datetime) -> ParticipantRecord:
    return ParticipantRecord(
        participant_key=f"{n:064x}",
        role=ParticipantRole.PATIENT,
        status=ParticipantStatus.LEFT,
        joined_at=at,
        first_joined_at=at,
        last_event_at=at,
    )


def _writeback(visit_key: str, at: datetime) -> WritebackRecord:
    return WritebackRecord(
        key=uuid.uuid4().hex,
        visit_key=visit_key,
        region=REGION,
        participant_key=f"{1:064x}",
        role=ParticipantRole.PATIENT,
        transition=TransitionKind.CONNECT,
        at=at,
        created_at=at,
        updated_at=at,
    )


def _subscription(sub_id: str, visit_key: str, expires_at: datetime) -> GraphSubscription:
    return GraphSubscription(
        subscription_id=sub_id,
        region=REGION,
        visit_key=visit_key,
        tenant_id="tid",
        client_state_sealed="sealed",
        expires_at=expires_at,
        created_at=expires_at - timedelta(days=2),
    )


def seed(c: Container, now: datetime, *, nonces: int = 3) -> Seeded:
    """Expired and live rows of every kind the purge knows."""
    s = Seeded()
    visits, subs = table_name(REGION, "visits"), table_name(REGION, "subs")
    ago = now - timedelta(days=10)

    def visit(record: Visit, participants: int, *, gone: bool) -> None:
        c.visits.create(record)
        rows = [RowWrite(_participant(n, ago)) for n in range(participants)]
        rows.append(RowWrite(_writeback(record.visit_key, ago)))
        c.visits.commit(record.visit_key, [[r] for r in rows])
        keys = ["visit", *(f"p-{n:064x}" for n in range(participants))]
        (s.gone if gone else s.kept).extend((visits, record.visit_key, k) for k in keys)

    # Ended 10 days ago, with its subscription record: all of it goes.
    ended = _key()
    visit(
        _visit(ended, now, status=VisitStatus.ENDED, ended_at=ago, subscription_id="s-1"),
        2,
        gone=True,
    )
    c.subscriptions.upsert(_subscription("s-1", ended, now - timedelta(days=8)))
    s.gone += [(subs, "s-1", "sub"), (subs, "live-index", "s-1")]
    # 150 participants: more rows than one transaction holds.
    visit(_visit(_key(), now, status=VisitStatus.ENDED, ended_at=ago), 150, gone=True)
    # Never started, created 10 days ago: expired a day later, due 7 days after that.
    visit(_visit(_key(), now), 1, gone=True)
    # Ended two days ago, with a patient's arrival: kept (and not taken for abandoned).
    recent = _key()
    visit(
        _visit(recent, now, status=VisitStatus.ENDED, ended_at=now - timedelta(days=2)),
        1,
        gone=False,
    )
    c.visits.record_patient_arrival(recent, patient_arrival(ago))
    s.kept.append((visits, recent, "p-patient-launch"))
    # Live: kept, whatever its purge_after says.
    live = _key()
    visit(
        _visit(live, now, status=VisitStatus.LIVE, updated_at=now - timedelta(hours=1)),
        1,
        gone=False,
    )
    # A patient opened it, no clinician ever did: their arrival and no visit row.
    abandoned = _key()
    c.visits.record_patient_arrival(abandoned, patient_arrival(ago))
    s.gone.append((visits, abandoned, "p-patient-launch"))

    # Subscriptions: expired (its visit still there), live, and pending ones.
    c.subscriptions.upsert(_subscription("s-2", live, now - timedelta(days=1)))
    s.gone += [(subs, "s-2", "sub"), (subs, "live-index", "s-2")]
    c.subscriptions.upsert(_subscription("s-3", live, now + timedelta(days=1)))
    s.kept += [(subs, "s-3", "sub"), (subs, "live-index", "s-3")]
    c.subscriptions.put_pending(
        "p-old", _subscription("pending-p-old", live, now - timedelta(days=1))
    )
    s.gone.append((subs, "pending-p-old", "sub"))
    c.subscriptions.put_pending(
        "p-new", _subscription("pending-p-new", live, now + timedelta(minutes=5))
    )
    s.kept.append((subs, "pending-p-new", "sub"))

    # Nonces and portal sessions, by ExpiresAt.
    nonce_table = table_name(REGION, "nonces")
    for _ in range(nonces):
        key = _key()
        c.nonces.consume(key, expires_at=now - timedelta(minutes=1))
        s.gone.append((nonce_table, key, "used"))
    key = _key()
    c.nonces.consume(key, expires_at=now + timedelta(minutes=10))
    s.kept.append((nonce_table, key, "used"))
    sessions = table_name(REGION, "portalsessions")
    for expires, bucket in ((now - timedelta(hours=1), s.gone), (now + timedelta(hours=1), s.kept)):
        key = _key()
        c.store.create_entity(
            sessions,
            {
                "PartitionKey": key,
                "RowKey": "session",
                "Kind": "portalsession",
                "Region": REGION.value,
                "ExpiresAt": expires.isoformat(),
                "Sealed": "sealed",
            },
        )
        bucket.append((sessions, key, "session"))

    # Mappings, by last use.
    maps = table_name(REGION, "usermaps")
    for last_used, bucket in (
        (now - timedelta(days=366), s.gone),
        (now - timedelta(days=10), s.kept),
    ):
        key = _key()
        c.mappings.upsert(
            EhrUserMapping(
                ehr_user_key=key,
                region=REGION,
                tenant_id="tid",
                entra_oid=str(uuid.uuid4()),
                entra_tid="tid",
                created_at=last_used,
                last_used_at=last_used,
            )
        )
        bucket.append((maps, key, "map"))
    return s


def _exists(store: EntityStore, row: tuple[str, str, str]) -> bool:
    try:
        store.get_entity(*row)
    except NotFoundError:
        return False
    return True


EXPECTED = {
    "visits": 3,
    "abandoned": 1,
    "subscriptions": 2,
    "nonces": 3,
    "sessions": 1,
    "mappings": 1,
}


def _deleted(report: RetentionReport) -> dict[str, int]:
    return {name: getattr(report, name) for name in DELETED}


def test_purge_deletes_exactly_the_expired_rows_and_logs_counts(
    new_store: Callable[[], EntityStore], caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC) + SHIFT
    c = _container(new_store(), now)
    seeded = seed(c, now)
    with caplog.at_level(logging.INFO, logger="connector.retention"):
        report = purge_expired(c)
    assert _deleted(report) == EXPECTED
    assert report.visits_kept == 2 and report.failed == 0
    # Each visit: its row, participants and one ledger row; then the abandoned arrival row.
    assert report.visit_rows == (1 + 2 + 1) + (1 + 150 + 1) + (1 + 1 + 1) + 1
    assert [row for row in seeded.gone if _exists(c.store, row)] == []
    assert [row for row in seeded.kept if not _exists(c.store, row)] == []

    lines = [r.getMessage() for r in caplog.records if "retention.purged" in r.getMessage()]
    assert len(lines) == 1
    fields = dict(part.split("=", 1) for part in lines[0].split()[1:])
    assert fields.pop("correlation_id")
    assert all(value.isdigit() for value in fields.values()), lines[0]  # counts, nothing else

    # Idempotent: a second run finds nothing more to delete and keeps what it kept.
    again = purge_expired(c)
    assert _deleted(again) == dict.fromkeys(DELETED, 0) and again.failed == 0
    assert [row for row in seeded.kept if not _exists(c.store, row)] == []


def test_two_instances_at_once_delete_each_row_once(
    new_store: Callable[[], EntityStore],
) -> None:
    now = datetime.now(UTC) + SHIFT
    seeded = seed(_container(new_store(), now), now)
    instances = [_container(new_store(), now) for _ in range(2)]
    reports: list[RetentionReport] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(c: Container) -> None:
        start.wait()
        try:
            reports.append(purge_expired(c))
        except BaseException as error:  # the test reports it
            errors.append(error)

    threads = [threading.Thread(target=run, args=(c,)) for c in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and len(reports) == 2
    assert all(r.failed == 0 for r in reports)
    combined = {name: sum(getattr(r, name) for r in reports) for name in DELETED}
    assert combined == EXPECTED  # each row deleted by exactly one of them
    store = instances[0].store
    assert [row for row in seeded.gone if _exists(store, row)] == []
    assert [row for row in seeded.kept if not _exists(store, row)] == []


def test_each_run_is_bounded_and_the_next_one_continues(
    new_store: Callable[[], EntityStore],
) -> None:
    now = datetime.now(UTC) + SHIFT
    c = _container(new_store(), now)
    seeded = seed(c, now, nonces=7)
    nonce_rows = [row for row in seeded.gone if row[0].endswith("nonces")]
    runs = [purge_expired(c, limit=3).nonces for _ in range(4)]
    assert runs == [3, 3, 1, 0]
    assert [row for row in nonce_rows if _exists(c.store, row)] == []


# --- the write-time filter, with a fake store clock --------------------------------------------


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_rows_written_within_the_period_are_not_even_examined() -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    clock = _Clock(t0)
    store = InMemoryEntityStore(clock=clock)
    c = _container(store, t0)
    c.clock = clock
    old = _visit(
        _key(), t0 - timedelta(days=30), status=VisitStatus.ENDED, ended_at=t0 - timedelta(days=30)
    )
    c.visits.create(old)  # written at t0 although its record says it ended long before
    clock.now = t0 + timedelta(days=6)
    report = purge_expired(c)
    assert report.visits == 0 and report.visits_kept == 0  # not a candidate: written 6 days ago
    clock.now = t0 + timedelta(days=7, seconds=1)
    assert purge_expired(c).visits == 1


def test_a_kept_visit_records_when_it_is_due_and_leaves_the_candidates() -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    clock = _Clock(t0)
    store = InMemoryEntityStore(clock=clock)
    c = _container(store, t0)
    c.clock = clock
    # Retention raised from 7 to 30 days after this visit was written: kept until day 30.
    c.visits.create(
        _visit(
            _key(), t0, status=VisitStatus.ENDED, ended_at=t0, purge_after=t0 + timedelta(days=30)
        )
    )
    clock.now = t0 + timedelta(days=8)
    assert purge_expired(c).visits_kept == 1
    clock.now = t0 + timedelta(days=9)
    assert purge_expired(c).visits_kept == 0  # re-armed: written on day 8, not a candidate
    clock.now = t0 + timedelta(days=30, seconds=1)
    assert purge_expired(c).visits == 1


def test_mapping_touched_at_most_once_a_day_and_purged_after_the_period() -> None:
    from connector_core.service.launch import _touch_mapping

    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    clock = _Clock(t0)
    store = InMemoryEntityStore(clock=clock)
    c = _container(store, t0)
    c.clock = clock
    mapping = EhrUserMapping(
        ehr_user_key=_key(),
        region=REGION,
        tenant_id="tid",
        entra_oid=str(uuid.uuid4()),
        entra_tid="tid",
        created_at=t0,
        last_used_at=t0,
    )
    c.mappings.upsert(mapping)
    before = store.operations
    clock.now = t0 + timedelta(hours=23)
    _touch_mapping(c, mapping)
    assert store.operations == before  # a repeat clinician within the day: no table operation
    clock.now = t0 + timedelta(days=200)
    _touch_mapping(c, mapping)
    assert store.operations == before + 1
    assert c.mappings.get(mapping.ehr_user_key).record.last_used_at == clock.now
    clock.now = t0 + timedelta(days=200 + 364)
    assert purge_expired(c).mappings == 0  # used on day 200: kept for the year after
    clock.now = t0 + timedelta(days=200 + 365, seconds=1)
    assert purge_expired(c).mappings == 1


# --- the timer function ------------------------------------------------------------------------


def test_the_timer_is_registered_hourly_in_the_function_app() -> None:
    import function_app
    from devtools.host import index_functions

    info = next(f for f in index_functions(function_app.app) if f.name == "retention_purge")
    assert info.trigger_type.lower() == "timertrigger"
    assert info.trigger["schedule"] == "0 17 * * * *"  # NCRONTAB: minute 17 of every hour


def test_the_timer_purges_when_the_local_host_fires_it() -> None:
    import httpx

    import function_app
    from connector_core.bootstrap import set_container
    from devtools.host import LocalHost

    now = datetime.now(UTC) + SHIFT
    c = _container(InMemoryEntityStore(), now)
    seeded = seed(c, now)
    set_container(c)
    try:
        with LocalHost(function_app.app, run_triggers=False, log_requests=False) as host:
            response = httpx.post(
                f"{host.url}/admin/functions/retention_purge", json={}, timeout=10
            )
            assert response.status_code == 202
            deadline = datetime.now(UTC) + timedelta(seconds=20)
            while any(_exists(c.store, row) for row in seeded.gone):
                assert datetime.now(UTC) < deadline, "the purge did not run"
                threading.Event().wait(0.05)
    finally:
        set_container(None)
    assert [row for row in seeded.kept if not _exists(c.store, row)] == []
