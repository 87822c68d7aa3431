"""Repository semantics, run against the in-memory fake AND real Azurite (same assertions)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from connector_core.adapters.memory import InMemoryEntityStore
from connector_core.domain.models import (
    ConfigChange,
    EhrUserMapping,
    Environment,
    ParticipantRole,
    ParticipantStatus,
    Region,
    Visit,
    utcnow,
)
from connector_core.domain.presence import ParticipantRecord, TransitionKind, WritebackRecord
from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    NotFoundError,
    RegionMismatchError,
    StorageRejectedError,
)
from connector_core.ports import EntityStore, TransactionOp
from connector_core.repositories import (
    HISTORY_IN_RECORD,
    ConfigRepository,
    MappingRepository,
    NonceRepository,
    RowWrite,
    VisitRepository,
    WritebackRepository,
)
from tests.unit.test_domain import new_config


@pytest.fixture(params=["memory", "azurite"])
def store(request: pytest.FixtureRequest) -> Iterator[EntityStore]:
    if request.param == "memory":
        yield InMemoryEntityStore()
    else:
        from pydantic import SecretStr

        from connector_core.adapters.azure_storage import AzureTableStore
        from connector_core.settings import StorageSettings

        conn = request.getfixturevalue("storage_connection_string")
        yield AzureTableStore(StorageSettings(connection_string=SecretStr(conn)))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_config_round_trip_and_lookup_by_id(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    config = new_config(id=unique("cfg"), tenant_id=unique("tid"))
    etag = repo.add(config)
    got = repo.get(config.tenant_id, config.id)
    assert got.record == config and got.etag == etag
    assert repo.get_by_id(config.id).record == config
    assert [v.record.id for v in repo.list(config.tenant_id)] == [config.id]


def test_stale_etag_raises_named_conflict(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    config = new_config(id=unique("cfg"), tenant_id=unique("tid"))
    repo.add(config)
    first = repo.get(config.tenant_id, config.id)
    second = repo.get(config.tenant_id, config.id)
    now = utcnow()
    repo.update(first.record.change(by="a", at=now, approver_upn="x@y.example"), expected=first)
    with pytest.raises(ConcurrencyConflictError):
        repo.update(
            second.record.change(by="b", at=now, approver_upn="z@y.example"), expected=second
        )


def test_duplicate_url_per_environment_is_a_conflict_with_existing_id(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    tenant = unique("tid")
    first = new_config(id=unique("cfg"), tenant_id=tenant)
    repo.add(first)
    with pytest.raises(ConflictError) as caught:
        repo.add(new_config(id=unique("cfg"), tenant_id=tenant))
    assert caught.value.extra["existingId"] == first.id
    # the same URL in the other environment is fine, and so is another tenant
    repo.add(new_config(id=unique("cfg"), tenant_id=tenant, environment=Environment.PRODUCTION))
    repo.add(new_config(id=unique("cfg"), tenant_id=unique("tid")))
    assert len(repo.list(tenant)) == 2


def test_changing_the_url_moves_the_uniqueness_row(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    tenant = unique("tid")
    config = new_config(id=unique("cfg"), tenant_id=tenant)
    repo.add(config)
    current = repo.get(tenant, config.id)
    moved = current.record.change(by="a", at=utcnow(), fhir_base_url="https://other.example/fhir")
    repo.update(moved, expected=current)
    # the old URL is free again, the new one taken
    repo.add(new_config(id=unique("cfg"), tenant_id=tenant))
    with pytest.raises(ConflictError):
        repo.add(
            new_config(
                id=unique("cfg"), tenant_id=tenant, fhir_base_url="https://other.example/fhir"
            )
        )


def test_tenant_isolation(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    config = new_config(id=unique("cfg"), tenant_id=unique("tid"))
    repo.add(config)
    with pytest.raises(NotFoundError):
        repo.get(unique("other-tenant"), config.id)
    assert repo.list(unique("other-tenant")) == []


def test_delete_is_idempotent_and_frees_the_url(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    config = new_config(id=unique("cfg"), tenant_id=unique("tid"))
    repo.add(config)
    repo.delete(config.tenant_id, config.id)
    repo.delete(config.tenant_id, config.id)
    with pytest.raises(NotFoundError):
        repo.get_by_id(config.id)
    repo.add(new_config(id=unique("cfg"), tenant_id=config.tenant_id))


def test_region_guard(store: EntityStore) -> None:
    americas = ConfigRepository(store, region=Region.AMERICAS)
    with pytest.raises(RegionMismatchError):
        americas.add(new_config(id=unique("cfg"), region=Region.EMEA))
    # a record that is somehow in this region's table but of another region is refused on read
    emea_visits = VisitRepository(store, region=Region.EMEA)
    now = utcnow()
    key = unique("vk")
    visit = Visit(
        visit_key=key,
        region=Region.EMEA,
        config_id="c",
        tenant_id="t",
        created_at=now,
        updated_at=now,
    )
    emea_visits.create(visit)
    entity, _ = store.get_entity("vvemeavisits", key, "visit")
    store.upsert_entity("vvamericasvisits", entity)
    with pytest.raises(RegionMismatchError):
        VisitRepository(store, region=Region.AMERICAS).get(key)


def test_visits_create_once_then_update_with_etag(store: EntityStore) -> None:
    repo = VisitRepository(store, region=Region.AMERICAS)
    now = utcnow()
    visit = Visit(
        visit_key=unique("vk"),
        region=Region.AMERICAS,
        config_id="c",
        tenant_id="t",
        created_at=now,
        updated_at=now,
    )
    etag = repo.create(visit)
    with pytest.raises(ConflictError):
        repo.create(visit)
    new_etag = repo.update(visit.model_copy(update={"meeting_id": "m1"}), etag=etag)
    with pytest.raises(ConcurrencyConflictError):
        repo.update(visit, etag=etag)
    assert repo.get(visit.visit_key).etag == new_etag
    repo.delete(visit.visit_key)
    repo.delete(visit.visit_key)
    with pytest.raises(NotFoundError):
        repo.get(visit.visit_key)


def test_mappings_and_nonces(store: EntityStore) -> None:
    mappings = MappingRepository(store, region=Region.AMERICAS)
    now = utcnow()
    mapping = EhrUserMapping(
        ehr_user_key=unique("uk"),
        region=Region.AMERICAS,
        tenant_id="t",
        entra_oid="o",
        entra_tid="t",
        created_at=now,
        last_used_at=now,
    )
    mappings.upsert(mapping)
    assert mappings.get(mapping.ehr_user_key).record == mapping
    nonces = NonceRepository(store, region=Region.AMERICAS)
    nonce = unique("n")
    nonces.consume(nonce, expires_at=now + timedelta(minutes=10))
    with pytest.raises(ConflictError):
        nonces.consume(nonce, expires_at=now + timedelta(minutes=10))


# --- rows of their own (issue 12): a visit's partition, a config's audit trail, errors --------


def _participant(n: int) -> ParticipantRecord:
    return ParticipantRecord(
        participant_key=f"{n:064x}",
        role=ParticipantRole.PATIENT,
        status=ParticipantStatus.CONNECTED,
        joined_at=utcnow(),
        first_joined_at=utcnow(),
        last_event_at=utcnow(),
    )


def _writeback(visit_key: str, n: int) -> WritebackRecord:
    now = utcnow()
    return WritebackRecord(
        key=f"{n:032x}",
        visit_key=visit_key,
        region=Region.AMERICAS,
        participant_key=f"{n:064x}",
        role=ParticipantRole.PATIENT,
        transition=TransitionKind.CONNECT,
        at=now,
        created_at=now,
        updated_at=now,
    )


def test_a_visits_rows_commit_in_batches_and_read_by_key(store: EntityStore) -> None:
    repo = VisitRepository(store, region=Region.AMERICAS)
    now = utcnow()
    key = unique("vk")
    visit = Visit(
        visit_key=key,
        region=Region.AMERICAS,
        config_id="c",
        tenant_id="t",
        created_at=now,
        updated_at=now,
    )
    etag = repo.create(visit)
    live = visit.model_copy(update={"meeting_id": "m"})
    writes = [RowWrite(live, etag=etag)]
    writes += [RowWrite(_participant(n)) for n in range(120)]
    writes += [RowWrite(_writeback(key, n)) for n in range(100)]
    etags = repo.commit(key, [writes])  # 221 rows: three transactions of at most 100
    assert len(etags) == 221
    rows = repo.read(
        key,
        participants=[f"{n:064x}" for n in range(0, 120, 7)],
        writebacks=[f"{n:032x}" for n in range(30)] + ["absent"],
    )
    assert rows.visit is not None and rows.visit.record.meeting_id == "m"
    assert len(rows.participants) == len(range(0, 120, 7)) and len(rows.writebacks) == 30
    assert len(repo.participants(live)) == 120
    # the visit page's one query: the visit row and its participants, not the ledger
    both, participants = repo.with_participants(key)
    assert both.meeting_id == "m" and len(participants) == 120
    assert len(WritebackRepository(store, region=Region.AMERICAS).list_for_visit(key)) == 100
    # a stale row in a batch: nothing of that batch is written
    stale = rows.participants[f"{0:064x}"]
    repo.commit(
        key,
        [
            [
                RowWrite(
                    stale.record.model_copy(update={"status": ParticipantStatus.LEFT}),
                    etag=stale.etag,
                )
            ]
        ],
    )
    with pytest.raises(ConcurrencyConflictError):
        repo.commit(
            key,
            [[RowWrite(_participant(500)), RowWrite(stale.record, etag=stale.etag)]],
        )
    assert f"{500:064x}" not in repo.read(key, participants=[f"{500:064x}"]).participants
    repo.delete(key)
    assert repo.read(key, all_participants=True).participants == {}


def test_a_configs_audit_trail_is_rows_of_its_own(store: EntityStore) -> None:
    repo = ConfigRepository(store, region=Region.AMERICAS)
    config = new_config(id=unique("cfg"), tenant_id=unique("tid"))
    repo.add(
        config.model_copy(
            update={"history": (ConfigChange(at=utcnow(), by="a", action="created"),)}
        )
    )
    for n in range(HISTORY_IN_RECORD + 15):
        current = repo.get(config.tenant_id, config.id)
        changed = current.record.change(
            by="admin", at=utcnow(), approver_upn=f"approver{n}@contoso.example"
        )
        repo.update(changed, expected=current)
    assert len(repo.get(config.tenant_id, config.id).record.history) == HISTORY_IN_RECORD
    trail = repo.history(config.tenant_id, config.id)
    assert [c.action for c in trail] == ["created"] + ["updated"] * (HISTORY_IN_RECORD + 15)
    assert [v.record.id for v in repo.list(config.tenant_id)] == [config.id]  # configs only
    repo.delete(config.tenant_id, config.id)
    assert repo.history(config.tenant_id, config.id) == []


def test_storage_errors_keep_their_status_and_code(store: EntityStore) -> None:
    table, partition = "vvamericaserrors", unique("pk")
    etag = store.create_entity(table, {"PartitionKey": partition, "RowKey": "r", "Record": "x"})
    with pytest.raises(ConflictError) as exists:
        store.create_entity(table, {"PartitionKey": partition, "RowKey": "r", "Record": "x"})
    assert exists.value.extra["status"] == 409
    store.update_entity(table, {"PartitionKey": partition, "RowKey": "r", "Record": "y"}, etag=etag)
    with pytest.raises(ConcurrencyConflictError) as stale:
        store.update_entity(
            table, {"PartitionKey": partition, "RowKey": "r", "Record": "z"}, etag=etag
        )
    assert stale.value.extra["status"] == 412
    with pytest.raises(NotFoundError) as missing:
        store.submit_transaction(
            table,
            [
                TransactionOp(
                    "update",
                    {"PartitionKey": partition, "RowKey": "nope", "Record": "x"},
                    etag=etag,
                )
            ],
        )
    assert missing.value.extra["status"] == 404
    # A property over 64 KiB: refused for good (400), never retried as if storage were down.
    too_big = {"PartitionKey": partition, "RowKey": "big", "Record": "x" * 40_000}
    with pytest.raises(StorageRejectedError) as refused:
        store.submit_transaction(table, [TransactionOp("upsert", too_big)])
    assert refused.value.extra["status"] == 400
    assert refused.value.extra["code"] == "PropertyValueTooLarge"


@pytest.mark.parametrize("extra", [{}, {"Count": 3}], ids=["own-batch", "sdk-batch"])
def test_batches_of_every_kind_return_the_etags_storage_holds(
    store: EntityStore, extra: dict[str, object]
) -> None:
    """Creates, conditional and unconditional replaces and deletes in one transaction, with
    keys that need quoting: the ETags returned are the ones storage then reports. (The Azure
    adapter writes string-only batches itself and leaves others, here an int, to the SDK.)"""
    table, partition = "vvamericasbatches", unique("pk's")
    first = store.create_entity(
        table, {"PartitionKey": partition, "RowKey": "a b+c:é", "Record": "1"}
    )
    store.create_entity(table, {"PartitionKey": partition, "RowKey": "gone", "Record": "x"})
    etags = store.submit_transaction(
        table,
        [
            TransactionOp(
                "create", {"PartitionKey": partition, "RowKey": "new'one", "Record": "é"}
            ),
            TransactionOp(
                "update",
                {"PartitionKey": partition, "RowKey": "a b+c:é", "Record": "2"},
                etag=first,
            ),
            TransactionOp(
                "upsert", {"PartitionKey": partition, "RowKey": "up", "Record": "3", **extra}
            ),
            TransactionOp("delete", {"PartitionKey": partition, "RowKey": "gone"}),
        ],
    )
    assert etags[3] is None
    for row_key, etag, value in (
        ("new'one", etags[0], "é"),
        ("a b+c:é", etags[1], "2"),
        ("up", etags[2], "3"),
    ):
        entity, stored = store.get_entity(table, partition, row_key)
        assert stored == etag and entity["Record"] == value
    assert [r["RowKey"] for r, _ in store.list_entities(table, partition_key=partition)] == [
        "a b+c:é",
        "new'one",
        "up",
    ]


@pytest.mark.parametrize("extra", [{}, {"Count": 3}], ids=["own-batch", "sdk-batch"])
def test_a_batch_deleting_a_missing_row_fails_whole(
    store: EntityStore, extra: dict[str, object]
) -> None:
    """A batch's delete of a row that is not there answers 404 even without an ETag (unlike a
    single delete, which is idempotent), and nothing else in the batch is written: the
    retention purge relies on it to notice another instance deleted first."""
    table, partition = "vvamericasbatches", unique("missing")
    with pytest.raises(NotFoundError) as missing:
        store.submit_transaction(
            table,
            [
                TransactionOp("upsert", {"PartitionKey": partition, "RowKey": "a", **extra}),
                TransactionOp("delete", {"PartitionKey": partition, "RowKey": "gone"}),
            ],
        )
    assert missing.value.extra["status"] == 404
    assert missing.value.extra["operation"] == 1
    assert store.list_entities(table, partition_key=partition) == []
    store.delete_entity(table, partition, "gone")  # a single delete stays idempotent
