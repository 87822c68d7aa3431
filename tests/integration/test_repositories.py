"""Repository semantics, run against the in-memory fake AND real Azurite (same assertions)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from connector_core.adapters.memory import InMemoryEntityStore
from connector_core.domain.models import (
    EhrUserMapping,
    Environment,
    Region,
    Visit,
    utcnow,
)
from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    NotFoundError,
    RegionMismatchError,
)
from connector_core.ports import EntityStore
from connector_core.repositories import (
    ConfigRepository,
    MappingRepository,
    NonceRepository,
    VisitRepository,
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
