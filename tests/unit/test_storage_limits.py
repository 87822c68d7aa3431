"""The Table Storage limits the storage layout relies on (``connector_core.repositories``), one
test per limit: the in-memory store refuses what Azure refuses (so the repositories are tested
against the real bounds), and the repositories stay inside each of them.

1 MiB per entity and 255 properties; 64 KiB per property; 100 operations and 4 MiB per batch;
15 comparisons per query filter.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from connector_core.adapters.azure_storage import _queries
from connector_core.adapters.memory import InMemoryEntityStore, entity_bytes
from connector_core.domain.models import (
    ConfigChange,
    Environment,
    ParticipantRole,
    ParticipantStatus,
    Region,
    TenantConfig,
    Visit,
)
from connector_core.domain.presence import ParticipantRecord, TransitionKind, WritebackRecord
from connector_core.errors import StorageRejectedError
from connector_core.ports import (
    MAX_BATCH_OPERATIONS,
    MAX_ENTITY_BYTES,
    MAX_FILTER_COMPARISONS,
    MAX_PROPERTIES,
    MAX_PROPERTY_BYTES,
    TransactionOp,
    property_bytes,
)
from connector_core.repositories import (
    HISTORY_IN_RECORD,
    ConfigRepository,
    RowWrite,
    VisitRepository,
)

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
VISIT = "f" * 32


class CountingStore(InMemoryEntityStore):
    """Records the size of every batch it commits."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def submit_transaction(self, table: str, ops: object) -> list[str | None]:
        result = super().submit_transaction(table, ops)  # type: ignore[arg-type]
        self.batches.append(len(ops))  # type: ignore[arg-type]
        return result


def visit() -> Visit:
    return Visit(
        visit_key=VISIT,
        region=Region.AMERICAS,
        config_id="cfg",
        tenant_id="tid",
        created_at=T0,
        updated_at=T0,
    )


def writeback(n: int, *, note: str | None = None) -> WritebackRecord:
    return WritebackRecord(
        key=f"{n:032x}",
        visit_key=VISIT,
        region=Region.AMERICAS,
        participant_key=f"p{n}",
        role=ParticipantRole.PATIENT,
        transition=TransitionKind.CONNECT,
        at=T0 + timedelta(seconds=n),
        last_error=note,
        created_at=T0,
        updated_at=T0,
    )


def participant(n: int) -> ParticipantRecord:
    return ParticipantRecord(
        participant_key=f"{n:064x}",
        role=ParticipantRole.PATIENT,
        status=ParticipantStatus.CONNECTED,
        joined_at=T0,
        first_joined_at=T0,
        last_event_at=T0,
    )


def largest_config(history: int) -> TenantConfig:
    """A config with every field at its longest (portal_models limits) and ``history``
    changes, each naming every field."""
    long_upn = "a" * 243 + "@contoso.org"  # 256 characters
    changes = tuple(
        ConfigChange(
            at=T0 + timedelta(minutes=n),
            by=long_upn,
            action="updated",
            fields=(
                "approver_upn",
                "ehr_endpoint_hosts",
                "ehr_vendor",
                "environment",
                "fhir_base_url",
                "smart_client_id",
            ),
        )
        for n in range(history)
    )
    return TenantConfig(
        id="c" * 32,
        tenant_id="85045508-f5bd-405e-a553-52700f86e29c",
        region=Region.AMERICAS,
        fhir_base_url="https://ehr.example/" + "p" * 2020,  # 2048 characters
        approver_upn=long_upn,
        approver_oid="f92ca67f-0564-414b-8caa-8c95b8099928",
        environment=Environment.PRODUCTION,
        smart_client_id="x" * 128,
        created_at=T0,
        created_by=long_upn,
        updated_at=T0,
        ehr_validated_at=T0,
        ehr_validated_by=long_upn,
        approved_at=T0,
        approved_by=long_upn,
        ehr_endpoint_hosts=tuple(f"{'h' * 60}{n}.example" for n in range(8)),
        history=changes,
    )


# --- 100 operations per batch ---------------------------------------------------------------------


def test_a_batch_holds_at_most_100_operations() -> None:
    store = InMemoryEntityStore()
    ops = [
        TransactionOp("upsert", {"PartitionKey": "p", "RowKey": f"r{n}", "Record": "x"})
        for n in range(MAX_BATCH_OPERATIONS + 1)
    ]
    with pytest.raises(StorageRejectedError) as refused:
        store.submit_transaction("t", ops)
    assert refused.value.extra["status"] == 400
    # A visit's changes larger than one batch are packed into batches of at most 100.
    counting = CountingStore()
    repo = VisitRepository(counting, region=Region.AMERICAS)
    repo.create(visit())
    writes = [RowWrite(participant(n)) for n in range(120)] + [
        RowWrite(writeback(n)) for n in range(130)
    ]
    repo.commit(VISIT, [writes])
    assert counting.batches == [100, 100, 50]
    assert len(repo.participants(visit())) == 120


def test_the_rows_of_one_event_share_a_batch_unless_the_event_alone_is_larger() -> None:
    counting = CountingStore()
    repo = VisitRepository(counting, region=Region.AMERICAS)
    repo.create(visit())
    event = [RowWrite(participant(n)) for n in range(60)]  # one roster update, 60 people
    second = [RowWrite(participant(100 + n)) for n in range(60)]
    huge = [RowWrite(writeback(n)) for n in range(150)]
    repo.commit(VISIT, [event, second, huge])
    assert counting.batches == [60, 60, 100, 50]


# --- 4 MiB per batch ------------------------------------------------------------------------------


def test_a_batch_holds_at_most_4_mib() -> None:
    store = InMemoryEntityStore()
    big = "x" * (MAX_PROPERTY_BYTES // 2 - 100)  # just under 64 KiB once stored as UTF-16
    ops = [
        TransactionOp("upsert", {"PartitionKey": "p", "RowKey": f"r{n}", "Record": big})
        for n in range(80)
    ]
    with pytest.raises(StorageRejectedError) as refused:
        store.submit_transaction("t", ops)  # 80 x 64 KiB = 5 MiB
    assert refused.value.extra["code"] == "RequestBodyTooLarge"
    # Rows that large are packed by size as well as by count.
    counting = CountingStore()
    repo = VisitRepository(counting, region=Region.AMERICAS)
    repo.create(visit())
    note = "e" * 30_000  # a write-back row near the property limit
    repo.commit(VISIT, [[RowWrite(writeback(n, note=note)) for n in range(100)]])
    assert len(counting.batches) >= 2 and sum(counting.batches) == 100


# --- 64 KiB per property --------------------------------------------------------------------------


def test_a_property_holds_at_most_64_kib() -> None:
    store = InMemoryEntityStore()
    with pytest.raises(StorageRejectedError) as refused:
        store.create_entity(
            "t", {"PartitionKey": "p", "RowKey": "r", "Record": "x" * (MAX_PROPERTY_BYTES // 2 + 1)}
        )
    assert refused.value.extra["code"] == "PropertyValueTooLarge"


def test_a_config_edited_a_thousand_times_stays_far_below_the_property_limit() -> None:
    """The audit trail that failed at the 279th edit: the record keeps its latest changes, the
    rest are rows of their own, so edits and approvals keep working."""
    store = InMemoryEntityStore()
    repo = ConfigRepository(store, region=Region.AMERICAS)
    config = largest_config(history=1)
    repo.add(config)
    for n in range(1000):
        current = repo.get(config.tenant_id, config.id)
        changed = current.record.change(
            by="admin@contoso.example",
            at=T0 + timedelta(hours=1, seconds=n),
            environment=Environment.TEST if n % 2 == 0 else Environment.PRODUCTION,
        )
        repo.update(changed, expected=current)
    entity, _ = store.get_entity("vvamericasconfigs", config.tenant_id, config.id)
    assert property_bytes(entity["Record"]) < MAX_PROPERTY_BYTES // 4
    assert len(repo.get(config.tenant_id, config.id).record.history) == HISTORY_IN_RECORD
    trail = repo.history(config.tenant_id, config.id)
    assert len(trail) == 1001 and trail == sorted(trail, key=lambda c: c.at)
    # Even its largest possible record, with the changes it keeps, is far below the limit.
    worst = largest_config(history=HISTORY_IN_RECORD).model_dump_json()
    assert property_bytes(worst) < MAX_PROPERTY_BYTES // 2


def test_a_config_written_before_history_rows_keeps_its_whole_trail() -> None:
    store = InMemoryEntityStore()
    repo = ConfigRepository(store, region=Region.AMERICAS)
    legacy = largest_config(history=60)
    entity = {
        "PartitionKey": legacy.tenant_id,
        "RowKey": legacy.id,
        "Kind": "config",
        "Region": "americas",
        "Record": legacy.model_dump_json(),
    }
    store.create_entity("vvamericasconfigs", entity)  # as the old code wrote it, with
    store.create_entity("vvamericasconfigs", repo._url_row(legacy))  # its uniqueness row
    assert len(repo.history(legacy.tenant_id, legacy.id)) == 60
    current = repo.get(legacy.tenant_id, legacy.id)
    changed = current.record.change(
        by="admin", at=T0 + timedelta(days=1), environment=Environment.TEST
    )
    repo.update(changed, expected=current)
    assert len(repo.history(legacy.tenant_id, legacy.id)) == 61


# --- 1 MiB and 255 properties per entity ----------------------------------------------------------


def test_an_entity_is_at_most_1_mib_and_255_properties() -> None:
    store = InMemoryEntityStore()
    with pytest.raises(StorageRejectedError) as too_many:
        store.create_entity(
            "t",
            {"PartitionKey": "p", "RowKey": "r", **{f"P{n}": "x" for n in range(MAX_PROPERTIES)}},
        )
    assert too_many.value.extra["code"] == "TooManyProperties"
    with pytest.raises(StorageRejectedError) as too_large:
        store.create_entity(
            "t",
            {"PartitionKey": "p", "RowKey": "r", **{f"P{n}": "x" * 32_000 for n in range(20)}},
        )
    assert too_large.value.extra["code"] == "EntityTooLarge"
    # Every kind of row the repositories write: a handful of properties, one of them the record.
    configs = ConfigRepository(store, region=Region.AMERICAS)
    configs.add(largest_config(history=HISTORY_IN_RECORD))
    visits = VisitRepository(store, region=Region.AMERICAS)
    visits.create(visit())
    visits.commit(VISIT, [[RowWrite(participant(1)), RowWrite(writeback(1))]])
    for rows in store.dump().values():
        for row in rows:
            assert len(row) + 1 <= 8  # + Timestamp
            assert entity_bytes(row) < MAX_ENTITY_BYTES // 8


# --- 15 comparisons per filter --------------------------------------------------------------------


def test_a_query_filter_holds_15_comparisons() -> None:
    keys = [f"w-{n:032x}" for n in range(40)]
    queries = _queries("pk", keys, None, None)
    assert len(queries) == math.ceil(40 / (MAX_FILTER_COMPARISONS - 1))
    for text, parameters in queries:
        assert (
            text.count(" eq ") + text.count(" ge ") + text.count(" lt ") <= MAX_FILTER_COMPARISONS
        )
        assert all(f"@{name} " in f"{text} " for name in parameters)
    with_where = _queries("pk", keys, None, {"Kind": "writeback"})
    assert all(text.count(" eq ") <= MAX_FILTER_COMPARISONS for text, _ in with_where)
    # A visit's rows are read 14 keys (and the partition) per round trip.
    store = InMemoryEntityStore()
    repo = VisitRepository(store, region=Region.AMERICAS)
    repo.create(visit())
    before = store.operations
    rows = repo.read(
        VISIT,
        participants=[f"{n:064x}" for n in range(20)],
        writebacks=[f"{n:032x}" for n in range(20)],
    )
    assert rows.visit is not None
    assert store.operations - before == math.ceil(41 / (MAX_FILTER_COMPARISONS - 1))
