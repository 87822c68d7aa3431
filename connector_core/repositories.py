"""Repositories: typed records over the ``EntityStore`` port, one table per kind and region.

Partitioning (so no partition gets hot, a tenant's configs stay together, and a visit's rows
share one partition, so its state change and its ledger entries commit in one transaction):

==============  =======================  ================================  ========================
table           PartitionKey             RowKey                            holds
==============  =======================  ================================  ========================
vv{r}configs    tenant id                config id                         the config (JSON in
                                                                           Record; its latest
                                                                           ``HISTORY_IN_RECORD``
                                                                           changes)
vv{r}configs    tenant id                ``url-{env}-{sha256}``            uniqueness of env + URL
vv{r}configs    tenant id                ``h-{config id}-{time}-{digest}``  one audit-trail entry
vv{r}configs    ``id-{config id}``       ``tenant``                        config id -> tenant
vv{r}usermaps   EHR user key (HMAC)      ``map``                           EHR user -> Entra oid
vv{r}visits     visit key (HMAC)         ``visit``                         meeting, subscription,
                                                                           call status
vv{r}visits     visit key (HMAC)         ``p-{participant key}``           one participant: role,
                                                                           status, times
vv{r}visits     visit key (HMAC)         ``p-patient-launch``              the patient's latest
                                                                           arrival (time only)
vv{r}visits     visit key (HMAC)         ``w-{write-back key}``            one write-back (ledger)
vv{r}reports    ``{tenant}|{yyyy-mm}``   ``{yyyy-mm-dd}|{visit key}``      one visit's summary
vv{r}reports    ``months``               ``{yyyy-mm}|{tenant}``            months holding summaries
vv{r}subs       Graph subscription id    ``sub``                           subscription -> visit
vv{r}subs       ``live-index``           Graph subscription id             subscriptions to renew
vv{r}subs       ``pending-{id}``         ``sub``                           a subscription being
                                                                           created
vv{r}nonces     nonce (random)           ``used``                          single-use state
==============  =======================  ================================  ========================

No entity grows with participants, events or edits: a participant, a write-back and a config
change are each a row of their own (``{time}`` in a history row key is the change's UTC time,
``%Y%m%dT%H%M%S%fZ``, so a prefix query lists the trail in order). A record is one JSON string
property (``Record``) beside a few small ones, so the Table Storage limits this layout relies on
(``connector_core.ports``) hold with room to spare, each checked by a test
(tests/unit/test_storage_limits.py):

* 64 KiB per property (32 K characters): the largest record, a config with maximal fields and
  ``HISTORY_IN_RECORD`` changes, stays far below it; visits no longer hold participants;
* 1 MiB per entity and 255 properties per entity: at most 8 properties of that size;
* 100 operations and 4 MiB per entity-group transaction: ``VisitRepository.commit`` packs a
  visit's changes into transactions of at most ``MAX_BATCH_OPERATIONS`` operations and
  ``MAX_BATCH_BYTES`` bytes, never splitting the rows of one event unless that event alone is
  larger (a roster update naming more than ~50 people), and the config history is written in
  batches of at most 100 as well;
* 15 comparisons per query filter: reading a visit's rows by key asks for at most
  ``MAX_ROW_KEYS_PER_QUERY`` keys per round trip.

Reports: a tenant's date range is one row-key range per month partition, read a page at a time
(``EntityStore.iter_entities``), so a year of summaries is never in memory at once and no other
tenant's rows are read; ``ReportRepository.delete_before`` finds old months through the
``months`` index partition, without scanning the table. The patient's arrival (``p-patient-launch``,
``connector_core.domain.waiting``) is a participant row: one upsert per launch, overwritten, so
the partition never grows with launches; the presence worker copies its time onto the patient's
own row at their first admission (the lobby wait's start, for reports).

Retention (``connector_core.service.retention``, an hourly timer; rules in
``connector_core.domain.retention``). The timer finds rows with ``EntityStore.scan_entities``:
visit, mapping and subscription rows not written (``Timestamp``) for their period, nonces and
portal sessions past ``ExpiresAt``; it deletes each under the ETag it read, so a row changed
meanwhile stays and two timers delete it once:

==============  ===========================================================================
table           deleted
==============  ===========================================================================
vv{r}visits     the whole partition ``CONNECTOR_RETENTION_DAYS`` after the visit ended or
                stopped being live (``VisitRepository.purge``, visit row last); a partition
                with no visit row (a patient's arrival only) that long after the arrival
                was last written (``abandoned``, ``purge_abandoned``)
vv{r}subs       a record (and its index row) or pending record once expired; with its visit
vv{r}nonces     past ``ExpiresAt``
vv{r}usermaps   ``CONNECTOR_MAPPING_RETENTION_DAYS`` after ``last_used_at``
vv{r}reports    ``CONNECTOR_REPORT_RETENTION_DAYS`` after the summary's day
vv{r}configs    never by the timer: with the config (its history rows too)
==============  ===========================================================================

Region guard: every entity carries ``Region``; reading or writing a record of another region
raises ``RegionMismatchError``, and tables are named per region.
"""

from __future__ import annotations

import builtins
import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from connector_core.domain.models import (
    ConfigChange,
    EhrUserMapping,
    GraphSubscription,
    Region,
    TenantConfig,
    Versioned,
    Visit,
)
from connector_core.domain.presence import ParticipantRecord, WritebackRecord, from_legacy
from connector_core.domain.reports import VisitSummary
from connector_core.domain.waiting import PATIENT_ARRIVAL_KEY
from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    NotFoundError,
    RegionMismatchError,
)
from connector_core.ports import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPERATIONS,
    EntityStore,
    TransactionOp,
    property_bytes,
)

__all__ = [
    "HISTORY_IN_RECORD",
    "VISIT_ROW",
    "ConfigRepository",
    "ExpiringRows",
    "MappingRepository",
    "NonceRepository",
    "ReportRepository",
    "RowWrite",
    "SubscriptionRepository",
    "VisitRepository",
    "VisitRows",
    "WritebackRepository",
    "participant_row",
    "table_name",
    "trim_history",
    "writeback_row",
]

# The latest changes a config record keeps itself (its view shows them); every change is also a
# row of its own (``ConfigRepository.history``), so the record never nears the 64 KiB limit.
HISTORY_IN_RECORD = 20
VISIT_ROW = "visit"

R = TypeVar("R", bound=BaseModel)


def table_name(region: Region, kind: str) -> str:
    return f"vv{region.value}{kind}"


def _stamp(at: datetime) -> str:
    """A time as stored in ``ExpiresAt``: UTC ISO 8601, so strings sort as times."""
    return at.astimezone(UTC).isoformat()


def _delete_unchanged(
    store: EntityStore, table: str, partition_key: str, row_key: str, etag: str
) -> bool:
    """Delete one row if it is as read (a one-operation batch answers 404 when the row is gone,
    where a plain delete hides it): True when this call deleted it, False when someone changed
    or deleted it meanwhile."""
    entity = {"PartitionKey": partition_key, "RowKey": row_key}
    try:
        store.submit_transaction(table, [TransactionOp("delete", entity, etag=etag)])
    except (ConcurrencyConflictError, NotFoundError):
        return False
    return True


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
        # The tenant's partition also holds uniqueness and history rows: only configs come back.
        rows = self._store.list_entities(
            self._table, partition_key=tenant_id, where={"Kind": "config"}
        )
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

    # --- the audit trail: one row per change (the record keeps the latest few) ----------------

    @staticmethod
    def _history_key(config_id: str, change: ConfigChange) -> str:
        at = change.at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        digest = hashlib.sha256(change.model_dump_json().encode()).hexdigest()[:12]
        return f"h-{config_id}-{at}-{digest}"

    def _history_ops(
        self, config: TenantConfig, changes: Iterable[ConfigChange]
    ) -> builtins.list[TransactionOp]:
        # Upserts: a row's key is a function of the change, so writing one again is harmless.
        return [
            TransactionOp(
                "upsert",
                {
                    "PartitionKey": config.tenant_id,
                    "RowKey": self._history_key(config.id, change),
                    "Kind": "history",
                    "Region": self._region.value,
                    "ConfigId": config.id,
                    "Record": change.model_dump_json(),
                },
            )
            for change in changes
        ]

    def _write_old_history(self, config: TenantConfig) -> None:
        """Rows for changes about to leave the record (a config written before the trail had
        rows of its own), before the record is trimmed."""
        older = config.history[: -HISTORY_IN_RECORD - 1]
        ops = self._history_ops(config, older)
        for start in range(0, len(ops), MAX_BATCH_OPERATIONS):
            self._store.submit_transaction(self._table, ops[start : start + MAX_BATCH_OPERATIONS])

    def history(self, tenant_id: str, config_id: str) -> builtins.list[ConfigChange]:
        """The config's whole audit trail, oldest first."""
        rows = self._store.list_entities(
            self._table, partition_key=tenant_id, row_key_prefix=f"h-{config_id}-"
        )
        found = {
            str(row["RowKey"]): ConfigChange.model_validate_json(row["Record"]) for row, _ in rows
        }
        try:
            record = self.get(tenant_id, config_id).record
        except NotFoundError:
            return []
        for change in record.history:  # changes kept only in the record (written before rows)
            found.setdefault(self._history_key(config_id, change), change)
        return [found[key] for key in sorted(found)]

    def add(self, config: TenantConfig) -> str:
        """Create; ``ConflictError`` (with ``existingId``) if env + URL is already registered."""
        self._write_old_history(config)
        history = self._history_ops(config, config.history[-HISTORY_IN_RECORD - 1 :])
        config = trim_history(config)
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
                [
                    TransactionOp("create", row),
                    TransactionOp("create", self._url_row(config)),
                    *history,
                ],
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
        """Replace if unchanged since ``expected`` was read (``ConcurrencyConflictError``). The
        record keeps its latest ``HISTORY_IN_RECORD`` changes; every change also gets a row, in
        the same transaction."""
        self._write_old_history(config)
        history = self._history_ops(config, config.history[-HISTORY_IN_RECORD - 1 :])
        config = trim_history(config)
        row = self._codec.encode(config, config.tenant_id, config.id)
        ops = [TransactionOp("update", row, etag=expected.etag)]
        if _url_key(config) != _url_key(expected.record):
            ops += [
                TransactionOp("delete", self._url_row(expected.record)),
                TransactionOp("create", self._url_row(config)),
            ]
        ops += history
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
        trail = self._store.list_entities(
            self._table, partition_key=tenant_id, row_key_prefix=f"h-{config_id}-"
        )
        deletes = [TransactionOp("delete", row) for row, _ in trail]
        for start in range(0, len(deletes), MAX_BATCH_OPERATIONS):
            self._store.submit_transaction(
                self._table, deletes[start : start + MAX_BATCH_OPERATIONS]
            )
        with self._lock:
            self._tenant_of.pop(config_id, None)


def trim_history(config: TenantConfig) -> TenantConfig:
    """The config as stored: its latest ``HISTORY_IN_RECORD`` changes (the rest are rows)."""
    if len(config.history) <= HISTORY_IN_RECORD:
        return config
    return config.model_copy(update={"history": config.history[-HISTORY_IN_RECORD:]})


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

    def _stale(
        self, written_before: datetime, limit: int, start: str
    ) -> builtins.list[tuple[str, Versioned[R]]]:
        """``(partition key, record)`` of the records not written since ``written_before``
        (retention timer candidates; ``EntityStore.scan_entities``)."""
        rows = self._store.scan_entities(
            self._table,
            limit=limit,
            row_key=self.row_key,
            written_before=written_before,
            start=start,
        )
        return [
            (str(e["PartitionKey"]), Versioned[R](record=self._codec.decode(e), etag=t))
            for e, t in rows
        ]


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

    def stale(
        self, *, written_before: datetime, limit: int, start: str = ""
    ) -> builtins.list[Versioned[EhrUserMapping]]:
        """Mappings not written since ``written_before`` (a launch rewrites a mapping it uses
        at most once a day, so these are the long-unused ones; retention timer)."""
        return [found for _, found in self._stale(written_before, limit, start)]

    def remove(self, ehr_user_key: str, *, etag: str) -> bool:
        """Delete if unchanged since read (a launch that just used it wins)."""
        return _delete_unchanged(self._store, self._table, ehr_user_key, self.row_key, etag)


def participant_row(participant_key: str) -> str:
    return f"p-{participant_key}"


def writeback_row(writeback_key: str) -> str:
    return f"w-{writeback_key}"


@dataclass
class VisitRows:
    """Rows of one visit's partition as read (each with its ETag): the visit, some or all of
    its participants, some write-backs. Missing keys were not found."""

    visit: Versioned[Visit] | None
    participants: dict[str, Versioned[ParticipantRecord]] = field(default_factory=dict)
    writebacks: dict[str, Versioned[WritebackRecord]] = field(default_factory=dict)


@dataclass(frozen=True)
class RowWrite:
    """One row of a visit to write: created when ``etag`` is None, else replaced if unchanged
    since that ETag was read."""

    record: Visit | ParticipantRecord | WritebackRecord
    etag: str | None = None


class VisitRepository(_SingleRowRepository[Visit]):
    """A visit's partition: the ``visit`` row, a ``p-`` row per participant, a ``w-`` row per
    write-back (the ledger, also reachable as ``WritebackRepository``)."""

    row_key = VISIT_ROW

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        super().__init__(store, region=region, kind="visits", model=Visit)
        self._participant = _Codec(ParticipantRecord, region, "participant")
        self._writeback = _Codec(WritebackRecord, region, "writeback")

    def get(self, visit_key: str) -> Versioned[Visit]:
        return self._get(visit_key)

    def create(self, visit: Visit) -> str:
        return self._create(visit.visit_key, visit)

    def update(self, visit: Visit, *, etag: str) -> str:
        return self._update(visit.visit_key, visit, etag)

    def delete(self, visit_key: str) -> None:
        """The visit with its participants and ledger (when it is purged). Idempotent."""
        rows = self._store.list_entities(self._table, partition_key=visit_key)
        deletes = [TransactionOp("delete", row) for row, _ in rows]
        for start in range(0, len(deletes), MAX_BATCH_OPERATIONS):
            self._store.submit_transaction(
                self._table, deletes[start : start + MAX_BATCH_OPERATIONS]
            )

    def stale(
        self, *, written_before: datetime, limit: int, start: str = ""
    ) -> builtins.list[Versioned[Visit]]:
        """Visit rows not written since ``written_before`` (retention timer candidates)."""
        return [found for _, found in self._stale(written_before, limit, start)]

    def purge(self, visit_key: str, *, etag: str) -> int | None:
        """Delete the visit's partition if its visit row is still as read (``etag``). Returns
        the rows deleted, or None when someone changed or removed the visit meanwhile.

        The visit row goes in the last batch; each earlier batch (a visit with more than 99
        rows) re-writes it under its ETag, so any other write to the visit stops the purge, two
        timers racing delete it once, and a purge cut short leaves the visit row to be found
        again (never orphaned participant or ledger rows)."""
        rows = self._store.list_entities(self._table, partition_key=visit_key)
        head = next(((e, t) for e, t in rows if e.get("RowKey") == VISIT_ROW), None)
        if head is None or head[1] != etag:
            return None
        entity, current = head
        children = [TransactionOp("delete", e) for e, _ in rows if e.get("RowKey") != VISIT_ROW]
        room = MAX_BATCH_OPERATIONS - 1
        try:
            while len(children) > room:
                guard = TransactionOp("update", entity, etag=current)
                written = self._store.submit_transaction(self._table, [guard, *children[:room]])
                current, children = str(written[0]), children[room:]
            last = TransactionOp("delete", entity, etag=current)
            self._store.submit_transaction(self._table, [last, *children])
        except (ConcurrencyConflictError, NotFoundError):
            return None
        return len(rows)

    def abandoned(
        self, *, written_before: datetime, limit: int, start: str = ""
    ) -> builtins.list[str]:
        """Visit keys of patient arrival rows (``p-patient-launch``) not written since
        ``written_before``: a patient's launch writes its arrival before (or beside) the visit
        read, so a visit no clinician ever opened leaves a partition without a visit row
        (retention timer candidates for ``purge_abandoned``, which skips any with one)."""
        rows = self._store.scan_entities(
            self._table,
            limit=limit,
            row_key=participant_row(PATIENT_ARRIVAL_KEY),
            written_before=written_before,
            start=start,
        )
        return [str(e["PartitionKey"]) for e, _ in rows]

    def purge_abandoned(self, visit_key: str) -> int | None:
        """Delete a partition that has no visit row (each row under the ETag it was read with).
        None when it has a visit row (``purge`` decides then) or changed meanwhile."""
        rows = self._store.list_entities(self._table, partition_key=visit_key)
        if not rows or any(e.get("RowKey") == VISIT_ROW for e, _ in rows):
            return None  # gone already (another timer), or a visit's own rule applies
        deletes = [TransactionOp("delete", e, etag=t) for e, t in rows]
        try:
            for begin in range(0, len(deletes), MAX_BATCH_OPERATIONS):
                batch = deletes[begin : begin + MAX_BATCH_OPERATIONS]
                self._store.submit_transaction(self._table, batch)
        except (ConcurrencyConflictError, NotFoundError):
            return None
        return len(rows)

    # --- rows -------------------------------------------------------------------------------

    def _decode(self, entity: dict[str, Any], etag: str, rows: VisitRows) -> None:
        row_key = str(entity["RowKey"])
        if row_key == VISIT_ROW:
            rows.visit = Versioned[Visit](record=self._codec.decode(entity), etag=etag)
        elif row_key.startswith("p-"):
            record = self._participant.decode(entity)
            rows.participants[record.participant_key] = Versioned[ParticipantRecord](
                record=record, etag=etag
            )
        elif row_key.startswith("w-"):
            ledger = self._writeback.decode(entity)
            rows.writebacks[ledger.key] = Versioned[WritebackRecord](record=ledger, etag=etag)

    def read(
        self,
        visit_key: str,
        *,
        participants: Iterable[str] = (),
        writebacks: Iterable[str] = (),
        all_participants: bool = False,
    ) -> VisitRows:
        """The visit row and the named participant and write-back rows, in one round trip per
        ``MAX_ROW_KEYS_PER_QUERY`` keys (and one more for every participant when asked)."""
        rows = VisitRows(visit=None)
        keys = [VISIT_ROW]
        if not all_participants:
            keys += [participant_row(k) for k in participants]
        keys += [writeback_row(k) for k in writebacks]
        for entity, etag in self._store.list_entities(
            self._table, partition_key=visit_key, row_keys=keys
        ):
            self._decode(entity, etag, rows)
        if all_participants:
            for entity, etag in self._store.list_entities(
                self._table, partition_key=visit_key, row_key_prefix="p-"
            ):
                self._decode(entity, etag, rows)
        return rows

    def record_patient_arrival(self, visit_key: str, record: ParticipantRecord) -> None:
        """The patient's arrival row (``connector_core.domain.waiting``): one upsert, no read;
        overwritten by the next arrival and purged with the visit (or, with no visit row, by
        ``purge_abandoned``). It may precede the visit row."""
        self._store.upsert_entity(
            self._table,
            self._participant.encode(record, visit_key, participant_row(record.participant_key)),
        )

    def arrival(self, visit_key: str) -> ParticipantRecord | None:
        """The patient's arrival row as stored now, or None (one point read)."""
        try:
            entity, _ = self._store.get_entity(
                self._table, visit_key, participant_row(PATIENT_ARRIVAL_KEY)
            )
        except NotFoundError:
            return None
        return self._participant.decode(entity)

    def with_participants(self, visit_key: str) -> tuple[Visit, list[ParticipantRecord]]:
        """The visit row and every participant row in one query: the RowKey range from ``p-``
        through ``visit`` holds exactly those (the ledger's ``w-`` rows sort after it). The
        clinician's visit page checks this every second while it is open."""
        visit: Visit | None = None
        rows: list[ParticipantRecord] = []
        for entity in self._store.iter_entities(
            self._table, partition_key=visit_key, row_key_from="p-", row_key_to=VISIT_ROW + "~"
        ):
            row_key = str(entity["RowKey"])
            if row_key == VISIT_ROW:
                visit = self._codec.decode(entity)
            elif row_key.startswith("p-"):
                rows.append(self._participant.decode(entity))
        if visit is None:
            raise NotFoundError(f"No {self._what} record for this key.")
        found = {record.participant_key: record for record in rows}
        for legacy in visit.participants:  # a visit written before participants had rows
            found.setdefault(legacy.participant_key, from_legacy(legacy))
        return visit, list(found.values())

    def participants(self, visit: Visit) -> list[ParticipantRecord]:
        """Every participant of the visit (the live view and reports read these rows)."""
        rows = self._store.list_entities(
            self._table, partition_key=visit.visit_key, row_key_prefix="p-"
        )
        found = {
            record.participant_key: record
            for record in (self._participant.decode(row) for row, _ in rows)
        }
        for legacy in visit.participants:  # a visit written before participants had rows
            found.setdefault(legacy.participant_key, from_legacy(legacy))
        return list(found.values())

    def _entity(self, visit_key: str, write: RowWrite) -> dict[str, Any]:
        record = write.record
        if isinstance(record, Visit):
            return self._codec.encode(record, visit_key, VISIT_ROW)
        if isinstance(record, ParticipantRecord):
            return self._participant.encode(
                record, visit_key, participant_row(record.participant_key)
            )
        return self._writeback.encode(record, visit_key, writeback_row(record.key))

    def commit(self, visit_key: str, groups: Sequence[Sequence[RowWrite]]) -> dict[str, str]:
        """Write the rows, each group (one event's rows) atomically: groups are packed into
        entity-group transactions of at most 100 operations and 4 MiB, in order, and a group is
        split only when it alone exceeds a transaction. Returns the new ETag of every row by
        RowKey. Raises as the failing transaction does (``ConcurrencyConflictError`` for a stale
        ETag, ``ConflictError`` for a row created meanwhile); earlier transactions stay."""
        batches: list[list[TransactionOp]] = []
        batch: list[TransactionOp] = []
        size = 0
        for group in groups:
            ops = [
                TransactionOp(
                    "create" if w.etag is None else "update",
                    self._entity(visit_key, w),
                    etag=w.etag,
                )
                for w in group
            ]
            group_size = sum(_op_bytes(op) for op in ops)
            if batch and (
                len(batch) + len(ops) > MAX_BATCH_OPERATIONS or size + group_size > _BATCH_BUDGET
            ):
                batches.append(batch)
                batch, size = [], 0
            for op in ops:  # a group larger than a transaction is split (rare: see the doc)
                if batch and (
                    len(batch) >= MAX_BATCH_OPERATIONS or size + _op_bytes(op) > _BATCH_BUDGET
                ):
                    batches.append(batch)
                    batch, size = [], 0
                batch.append(op)
                size += _op_bytes(op)
        if batch:
            batches.append(batch)
        etags: dict[str, str] = {}
        for ops in batches:
            if len(ops) == 1:  # one row is atomic by itself, and cheaper than a batch
                op = ops[0]
                etags[str(op.entity["RowKey"])] = (
                    self._store.create_entity(self._table, op.entity)
                    if op.etag is None
                    else self._store.update_entity(self._table, op.entity, etag=op.etag)
                )
                continue
            for op, etag in zip(ops, self._store.submit_transaction(self._table, ops), strict=True):
                if etag is not None:
                    etags[str(op.entity["RowKey"])] = etag
        return etags


# Operations carry their entity plus the batch's per-operation framing (headers, boundaries):
# a kilobyte each is generous, and keeps a batch well inside the 4 MiB limit.
_OP_OVERHEAD = 1024
_BATCH_BUDGET = MAX_BATCH_BYTES - 64 * 1024


def _op_bytes(op: TransactionOp) -> int:
    return _OP_OVERHEAD + sum(
        property_bytes(str(k)) + property_bytes(v) for k, v in op.entity.items()
    )


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

    def stale(
        self, *, written_before: datetime, limit: int, start: str = ""
    ) -> builtins.list[tuple[str, Versioned[GraphSubscription]]]:
        """``(partition key, record)`` of subscription and pending records not written since
        ``written_before`` (renewal rewrites live ones; retention timer candidates)."""
        return self._stale(written_before, limit, start)

    def remove_stale(self, partition_key: str, *, etag: str) -> bool:
        """Delete a record found by ``stale`` if unchanged (a renewal wins), and its index row."""
        deleted = _delete_unchanged(self._store, self._table, partition_key, self.row_key, etag)
        if deleted and not partition_key.startswith("pending-"):
            self._store.delete_entity(self._table, self._INDEX, partition_key)
        return deleted


class WritebackRepository:
    """The presence write-back ledger (``domain.presence.WritebackRecord``): the ``w-`` rows of
    each visit's partition (see ``VisitRepository``)."""

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        self._store = store
        self._table = table_name(region, "visits")
        self._codec = _Codec(WritebackRecord, region, "writeback")

    def create(self, record: WritebackRecord) -> str:
        """Insert; ``ConflictError`` when this write-back is already in the ledger."""
        return self._store.create_entity(
            self._table, self._codec.encode(record, record.visit_key, writeback_row(record.key))
        )

    def get(self, visit_key: str, key: str) -> Versioned[WritebackRecord]:
        try:
            entity, etag = self._store.get_entity(self._table, visit_key, writeback_row(key))
        except NotFoundError:
            raise NotFoundError("No write-back record for this key.") from None
        return Versioned[WritebackRecord](record=self._codec.decode(entity), etag=etag)

    def update(self, record: WritebackRecord, *, etag: str) -> str:
        return self._store.update_entity(
            self._table,
            self._codec.encode(record, record.visit_key, writeback_row(record.key)),
            etag=etag,
        )

    def list_for_visit(self, visit_key: str) -> list[Versioned[WritebackRecord]]:
        rows = self._store.list_entities(self._table, partition_key=visit_key, row_key_prefix="w-")
        return [
            Versioned[WritebackRecord](record=self._codec.decode(row), etag=etag)
            for row, etag in rows
        ]


class ExpiringRows:
    """Rows of one table that carry ``ExpiresAt`` (nonces, portal sessions): found and deleted
    by the retention timer once it has passed."""

    def __init__(self, store: EntityStore, *, table: str, row_key: str) -> None:
        self._store = store
        self._table = table
        self._row_key = row_key

    def expired(self, *, now: datetime, limit: int, start: str = "") -> list[tuple[str, str]]:
        """``(partition key, etag)`` of rows whose ``ExpiresAt`` has passed."""
        rows = self._store.scan_entities(
            self._table,
            limit=limit,
            row_key=self._row_key,
            less_than={"ExpiresAt": _stamp(now)},
            start=start,
        )
        return [(str(e["PartitionKey"]), t) for e, t in rows]

    def remove(self, partition_key: str, *, etag: str) -> bool:
        return _delete_unchanged(self._store, self._table, partition_key, self._row_key, etag)


class NonceRepository(ExpiringRows):
    """Marks single-use values (OAuth state ids) as consumed; a second use is a replay."""

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        super().__init__(store, table=table_name(region, "nonces"), row_key="used")
        self._region = region

    def consume(self, nonce: str, *, expires_at: datetime) -> None:
        """Raises ``ConflictError`` if the nonce was consumed before."""
        self._store.create_entity(
            self._table,
            {
                "PartitionKey": nonce,
                "RowKey": "used",
                "Kind": "nonce",
                "Region": self._region.value,
                "ExpiresAt": _stamp(expires_at),
            },
        )

    def was_consumed(self, nonce: str) -> bool:
        """Whether ``nonce`` was consumed: one read, for error messages only ("already used"
        rather than "another browser"), never on a success path."""
        try:
            self._store.get_entity(self._table, nonce, "used")
        except NotFoundError:
            return False
        return True


class ReportRepository:
    """Visit summaries for reports (``domain.reports.VisitSummary``), partitioned by tenant and
    month, one row per visit keyed by its report day and visit key (module docstring)."""

    _INDEX = "months"

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        self._store = store
        self._region = region
        self._table = table_name(region, "reports")
        self._codec = _Codec(VisitSummary, region, "summary")
        self._indexed: set[str] = set()  # index rows this process wrote (one per tenant-month)
        self._lock = threading.Lock()

    @staticmethod
    def partition(tenant_id: str, day: date) -> str:
        return f"{tenant_id}|{day:%Y-%m}"

    @staticmethod
    def row_key(summary: VisitSummary) -> str:
        return f"{summary.day.isoformat()}|{summary.visit_key}"

    def put(self, summary: VisitSummary) -> None:
        """Write (replace) the visit's summary: one write, plus one the first time this
        process sees the tenant's month."""
        index_key = f"{summary.day:%Y-%m}|{summary.tenant_id}"
        if index_key not in self._indexed:
            self._index(index_key)
            with self._lock:
                if len(self._indexed) > 10_000:  # bounded: forgetting only costs a rewrite
                    self._indexed.clear()
                self._indexed.add(index_key)
        self._store.upsert_entity(
            self._table,
            self._codec.encode(
                summary, self.partition(summary.tenant_id, summary.day), self.row_key(summary)
            ),
        )

    def _index(self, index_key: str) -> None:
        self._store.upsert_entity(
            self._table,
            {
                "PartitionKey": self._INDEX,
                "RowKey": index_key,
                "Kind": "month",
                "Region": self._region.value,
            },
        )

    def put_many(self, summaries: Sequence[VisitSummary]) -> None:
        """Seeding and benchmarks: each tenant-month's summaries in batches of 100."""
        by_partition: dict[str, list[TransactionOp]] = {}
        months: set[str] = set()
        for summary in summaries:
            pk = self.partition(summary.tenant_id, summary.day)
            entity = self._codec.encode(summary, pk, self.row_key(summary))
            by_partition.setdefault(pk, []).append(TransactionOp("upsert", entity))
            months.add(f"{summary.day:%Y-%m}|{summary.tenant_id}")
        for index_key in sorted(months):
            self._index(index_key)
        for ops in by_partition.values():
            for start in range(0, len(ops), MAX_BATCH_OPERATIONS):
                self._store.submit_transaction(
                    self._table, ops[start : start + MAX_BATCH_OPERATIONS]
                )

    def iter_range(self, tenant_id: str, first: date, last: date) -> Iterator[VisitSummary]:
        """The tenant's summaries of days ``first`` to ``last`` (inclusive), by day, read a page
        at a time as the caller iterates."""
        month = date(first.year, first.month, 1)
        end = last + timedelta(days=1)
        while month <= last:
            for entity in self._store.iter_entities(
                self._table,
                partition_key=self.partition(tenant_id, month),
                row_key_from=first.isoformat() if month <= first else "",
                row_key_to=end.isoformat(),
            ):
                summary = self._codec.decode(entity)
                if summary.tenant_id == tenant_id:  # the partition says so; never trust alone
                    yield summary
            month = (month + timedelta(days=32)).replace(day=1)

    def delete_before(self, day: date, *, limit: int | None = None) -> int:
        """Delete every tenant's summaries of days before ``day`` (the retention purge calls
        this with today minus ``CONNECTOR_REPORT_RETENTION_DAYS``), at most about ``limit`` of
        them (whole transactions; the rest waits for the next call). Returns how many."""
        cutoff_month = f"{day:%Y-%m}"
        deleted = 0
        months = list(
            self._store.iter_entities(
                self._table, partition_key=self._INDEX, row_key_to=cutoff_month + "|~"
            )
        )
        for index in months:
            if limit is not None and deleted >= limit:
                break
            month, _, tenant_id = str(index["RowKey"]).partition("|")
            pk = f"{tenant_id}|{month}"
            batch: list[TransactionOp] = []
            complete = True
            for entity in self._store.iter_entities(
                self._table, partition_key=pk, row_key_to=day.isoformat()
            ):  # deleted 100 at a time as the pages come: a month is never held at once
                if limit is not None and deleted + len(batch) >= limit:
                    complete = False
                    break
                batch.append(
                    TransactionOp("delete", {"PartitionKey": pk, "RowKey": entity["RowKey"]})
                )
                if len(batch) == MAX_BATCH_OPERATIONS:
                    self._store.submit_transaction(self._table, batch)
                    deleted, batch = deleted + len(batch), []
            if batch:
                self._store.submit_transaction(self._table, batch)
                deleted += len(batch)
            if complete and month < cutoff_month:  # the whole month is gone
                self._store.delete_entity(self._table, self._INDEX, str(index["RowKey"]))
                with self._lock:
                    self._indexed.discard(str(index["RowKey"]))
        return deleted
