"""Repositories: typed records over the ``EntityStore`` port, one table per kind and region.

Partitioning (so no partition gets hot and a tenant's configs stay together):

==============  =======================  ==========================  ==============================
table           PartitionKey             RowKey                      holds
==============  =======================  ==========================  ==============================
vv{r}configs    tenant id                config id                   the config (JSON in Record)
vv{r}configs    tenant id                ``url-{env}-{sha256}``      uniqueness of env + FHIR URL
vv{r}configs    ``id-{config id}``       ``tenant``                  config id -> tenant (immutable)
vv{r}usermaps   EHR user key (HMAC)      ``map``                     EHR user -> Entra oid/tid
vv{r}visits     visit key (HMAC)         ``visit``                   meeting, subscription, roster
vv{r}subs       Graph subscription id    ``sub``                     subscription -> visit, secret
vv{r}subs       ``live-index``           Graph subscription id       subscriptions to renew (timer)
vv{r}writebacks visit key (HMAC)         write-back key              presence write-back ledger
vv{r}nonces     nonce (random)           ``used``                    single-use state consumption
==============  =======================  ==========================  ==============================

Region guard: every entity carries ``Region``; reading or writing a record of another region
raises ``RegionMismatchError``, and tables are named per region.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from connector_core.domain.models import (
    EhrUserMapping,
    GraphSubscription,
    Region,
    TenantConfig,
    Versioned,
    Visit,
)
from connector_core.domain.presence import WritebackRecord
from connector_core.errors import ConflictError, NotFoundError, RegionMismatchError
from connector_core.ports import EntityStore, TransactionOp

__all__ = [
    "ConfigRepository",
    "MappingRepository",
    "NonceRepository",
    "SubscriptionRepository",
    "VisitRepository",
    "WritebackRepository",
    "table_name",
]

R = TypeVar("R", bound=BaseModel)


def table_name(region: Region, kind: str) -> str:
    return f"vv{region.value}{kind}"


def _url_key(config: TenantConfig) -> str:
    return _url_key_of(config.environment.value, config.fhir_base_url)


def _url_key_of(environment: str, fhir_base_url: str) -> str:
    digest = hashlib.sha256(fhir_base_url.encode()).hexdigest()[:40]
    return f"url-{environment}-{digest}"


class _Codec(Generic[R]):
    """Record <-> entity, with the region guard."""

    def __init__(self, model: type[R], region: Region, kind: str) -> None:
        self.model = model
        self.region = region
        self.kind = kind

    def encode(self, record: R, partition_key: str, row_key: str) -> dict[str, Any]:
        record_region = getattr(record, "region", self.region)
        if record_region != self.region:
            raise RegionMismatchError(
                f"This deployment serves region {self.region.value}; the record belongs to "
                f"{Region(record_region).value}."
            )
        return {
            "PartitionKey": partition_key,
            "RowKey": row_key,
            "Kind": self.kind,
            "Region": self.region.value,
            "Record": record.model_dump_json(),
        }

    def decode(self, entity: dict[str, Any]) -> R:
        if entity.get("Region") != self.region.value:
            raise RegionMismatchError(
                f"This deployment serves region {self.region.value}; use the deployment of the "
                "record's own region."
            )
        return self.model.model_validate_json(entity["Record"])


class ConfigRepository:
    def __init__(self, store: EntityStore, *, region: Region) -> None:
        self._store = store
        self._region = region
        self._table = table_name(region, "configs")
        self._codec = _Codec(TenantConfig, region, "config")
        self._tenant_of: dict[str, str] = {}  # config id -> tenant id never changes: cache it
        self._lock = threading.Lock()

    def get(self, tenant_id: str, config_id: str) -> Versioned[TenantConfig]:
        try:
            entity, etag = self._store.get_entity(self._table, tenant_id, config_id)
        except NotFoundError:
            raise NotFoundError(f"No configuration {config_id}.") from None
        if entity.get("Kind") != "config":
            raise NotFoundError(f"No configuration {config_id}.")
        return Versioned[TenantConfig](record=self._codec.decode(entity), etag=etag)

    def get_by_id(self, config_id: str) -> Versioned[TenantConfig]:
        """Look a config up by id alone (launch URLs carry no tenant)."""
        tenant_id = self._tenant_of.get(config_id)
        if tenant_id is None:
            try:
                entity, _ = self._store.get_entity(self._table, f"id-{config_id}", "tenant")
            except NotFoundError:
                raise NotFoundError(f"No configuration {config_id}.") from None
            if entity.get("Region") != self._region.value:
                raise RegionMismatchError("This configuration belongs to another region.")
            tenant_id = str(entity["TenantId"])
            with self._lock:
                self._tenant_of[config_id] = tenant_id
        return self.get(tenant_id, config_id)

    def list(self, tenant_id: str) -> list[Versioned[TenantConfig]]:
        rows = self._store.list_entities(self._table, partition_key=tenant_id)
        return [
            Versioned[TenantConfig](record=self._codec.decode(row), etag=etag)
            for row, etag in rows
            if row.get("Kind") == "config"
        ]

    def find_id_by_url(self, tenant_id: str, environment: str, fhir_base_url: str) -> str | None:
        try:
            entity, _ = self._store.get_entity(
                self._table, tenant_id, _url_key_of(environment, fhir_base_url)
            )
        except NotFoundError:
            return None
        return str(entity["ConfigId"])

    def _url_row(self, config: TenantConfig) -> dict[str, Any]:
        return {
            "PartitionKey": config.tenant_id,
            "RowKey": _url_key(config),
            "Kind": "url",
            "Region": self._region.value,
            "ConfigId": config.id,
        }

    def add(self, config: TenantConfig) -> str:
        """Create; ``ConflictError`` (with ``existingId``) if env + URL is already registered."""
        row = self._codec.encode(config, config.tenant_id, config.id)
        index = {
            "PartitionKey": f"id-{config.id}",
            "RowKey": "tenant",
            "Kind": "index",
            "Region": self._region.value,
            "TenantId": config.tenant_id,
        }
        self._store.create_entity(self._table, index)
        try:
            etags = self._store.submit_transaction(
                self._table,
                [TransactionOp("create", row), TransactionOp("create", self._url_row(config))],
            )
        except ConflictError:
            self._store.delete_entity(self._table, f"id-{config.id}", "tenant")
            existing = self.find_id_by_url(
                config.tenant_id, config.environment.value, config.fhir_base_url
            )
            raise ConflictError(
                "This FHIR base URL is already registered for this environment.",
                existingId=existing,
            ) from None
        except Exception:
            self._store.delete_entity(self._table, f"id-{config.id}", "tenant")
            raise
        assert etags[0] is not None
        return etags[0]

    def update(self, config: TenantConfig, *, expected: Versioned[TenantConfig]) -> str:
        """Replace if unchanged since ``expected`` was read (``ConcurrencyConflictError``)."""
        row = self._codec.encode(config, config.tenant_id, config.id)
        ops = [TransactionOp("update", row, etag=expected.etag)]
        if _url_key(config) != _url_key(expected.record):
            ops += [
                TransactionOp("delete", self._url_row(expected.record)),
                TransactionOp("create", self._url_row(config)),
            ]
        try:
            etags = self._store.submit_transaction(self._table, ops)
        except ConflictError:
            existing = self.find_id_by_url(
                config.tenant_id, config.environment.value, config.fhir_base_url
            )
            raise ConflictError(
                "This FHIR base URL is already registered for this environment.",
                existingId=existing,
            ) from None
        assert etags[0] is not None
        return etags[0]

    def delete(self, tenant_id: str, config_id: str) -> None:
        """Idempotent."""
        try:
            current = self.get(tenant_id, config_id)
        except NotFoundError:
            return
        self._store.submit_transaction(
            self._table,
            [
                TransactionOp("delete", {"PartitionKey": tenant_id, "RowKey": config_id}),
                TransactionOp("delete", self._url_row(current.record)),
            ],
        )
        self._store.delete_entity(self._table, f"id-{config_id}", "tenant")
        with self._lock:
            self._tenant_of.pop(config_id, None)


class _SingleRowRepository(Generic[R]):
    row_key = "row"

    def __init__(self, store: EntityStore, *, region: Region, kind: str, model: type[R]) -> None:
        self._store = store
        self._table = table_name(region, kind)
        self._codec = _Codec(model, region, kind)
        self._what = kind.rstrip("s")

    def _get(self, key: str) -> Versioned[R]:
        try:
            entity, etag = self._store.get_entity(self._table, key, self.row_key)
        except NotFoundError:
            raise NotFoundError(f"No {self._what} record for this key.") from None
        return Versioned[R](record=self._codec.decode(entity), etag=etag)

    def _create(self, key: str, record: R) -> str:
        return self._store.create_entity(self._table, self._codec.encode(record, key, self.row_key))

    def _update(self, key: str, record: R, etag: str) -> str:
        return self._store.update_entity(
            self._table, self._codec.encode(record, key, self.row_key), etag=etag
        )

    def _upsert(self, key: str, record: R) -> str:
        return self._store.upsert_entity(self._table, self._codec.encode(record, key, self.row_key))

    def _delete(self, key: str) -> None:
        self._store.delete_entity(self._table, key, self.row_key)


class MappingRepository(_SingleRowRepository[EhrUserMapping]):
    row_key = "map"

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        super().__init__(store, region=region, kind="usermaps", model=EhrUserMapping)

    def get(self, ehr_user_key: str) -> Versioned[EhrUserMapping]:
        return self._get(ehr_user_key)

    def upsert(self, mapping: EhrUserMapping) -> str:
        return self._upsert(mapping.ehr_user_key, mapping)

    def delete(self, ehr_user_key: str) -> None:
        self._delete(ehr_user_key)


class VisitRepository(_SingleRowRepository[Visit]):
    row_key = "visit"

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        super().__init__(store, region=region, kind="visits", model=Visit)

    def get(self, visit_key: str) -> Versioned[Visit]:
        return self._get(visit_key)

    def create(self, visit: Visit) -> str:
        return self._create(visit.visit_key, visit)

    def update(self, visit: Visit, *, etag: str) -> str:
        return self._update(visit.visit_key, visit, etag)

    def delete(self, visit_key: str) -> None:
        self._delete(visit_key)


class SubscriptionRepository(_SingleRowRepository[GraphSubscription]):
    row_key = "sub"

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        super().__init__(store, region=region, kind="subs", model=GraphSubscription)

    def get(self, subscription_id: str) -> Versioned[GraphSubscription]:
        return self._get(subscription_id)

    # Every stored subscription is also listed in one small index partition, so the renewal
    # timer finds them without a table scan; delete() removes both.
    _INDEX = "live-index"

    def upsert(self, subscription: GraphSubscription) -> str:
        etag = self._upsert(subscription.subscription_id, subscription)
        self._store.upsert_entity(
            self._table,
            {
                "PartitionKey": self._INDEX,
                "RowKey": subscription.subscription_id,
                "Kind": "subindex",
                "Region": subscription.region.value,
                "VisitKey": subscription.visit_key,
            },
        )
        return etag

    def delete(self, subscription_id: str) -> None:
        self._delete(subscription_id)
        self._store.delete_entity(self._table, self._INDEX, subscription_id)

    # A subscription being created: written before Graph is asked (Graph may notify before the
    # record above exists), keyed by the id carried in its clientState, deleted once the record
    # is stored. Never in the index. Partition "pending-<id>" cannot meet a Graph id (a GUID).
    @staticmethod
    def _pending_key(pending_id: str) -> str:
        return f"pending-{pending_id}"

    def put_pending(self, pending_id: str, subscription: GraphSubscription) -> None:
        self._upsert(self._pending_key(pending_id), subscription)

    def get_pending(self, pending_id: str) -> Versioned[GraphSubscription]:
        return self._get(self._pending_key(pending_id))

    def delete_pending(self, pending_id: str) -> None:
        self._delete(self._pending_key(pending_id))

    def list_ids(self) -> list[str]:
        """Ids of every stored subscription (from the index partition)."""
        rows = self._store.list_entities(self._table, partition_key=self._INDEX)
        return [str(row["RowKey"]) for row, _ in rows]


class WritebackRepository:
    """The presence write-back ledger (see ``domain.presence.WritebackRecord``)."""

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        self._store = store
        self._table = table_name(region, "writebacks")
        self._codec = _Codec(WritebackRecord, region, "writeback")

    def create(self, record: WritebackRecord) -> str:
        """Insert; ``ConflictError`` when this write-back is already in the ledger."""
        return self._store.create_entity(
            self._table, self._codec.encode(record, record.visit_key, record.key)
        )

    def get(self, visit_key: str, key: str) -> Versioned[WritebackRecord]:
        try:
            entity, etag = self._store.get_entity(self._table, visit_key, key)
        except NotFoundError:
            raise NotFoundError("No write-back record for this key.") from None
        return Versioned[WritebackRecord](record=self._codec.decode(entity), etag=etag)

    def update(self, record: WritebackRecord, *, etag: str) -> str:
        return self._store.update_entity(
            self._table, self._codec.encode(record, record.visit_key, record.key), etag=etag
        )

    def list_for_visit(self, visit_key: str) -> list[Versioned[WritebackRecord]]:
        rows = self._store.list_entities(self._table, partition_key=visit_key)
        return [
            Versioned[WritebackRecord](record=self._codec.decode(row), etag=etag)
            for row, etag in rows
        ]

    def delete_visit(self, visit_key: str) -> None:
        """Remove a visit's ledger (with the visit record, when it is purged)."""
        for row, _ in self._store.list_entities(self._table, partition_key=visit_key):
            self._store.delete_entity(self._table, visit_key, str(row["RowKey"]))


class NonceRepository:
    """Marks single-use values (OAuth state ids) as consumed; a second use is a replay."""

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        self._store = store
        self._region = region
        self._table = table_name(region, "nonces")

    def consume(self, nonce: str, *, expires_at: datetime) -> None:
        """Raises ``ConflictError`` if the nonce was consumed before."""
        self._store.create_entity(
            self._table,
            {
                "PartitionKey": nonce,
                "RowKey": "used",
                "Kind": "nonce",
                "Region": self._region.value,
                "ExpiresAt": expires_at.isoformat(),
            },
        )
