"""In-memory fakes of the storage ports, with the same semantics as the Azure adapters.

Used by unit tests and anywhere a process needs storage without Azurite. Thread-safe. It
enforces Table Storage's limits (``connector_core.ports``: entity and property sizes, property
count, operations and bytes per batch, comparisons per query) with the errors Azure answers, so
code tested against it cannot quietly depend on more than the service allows. ``fail_next``
makes the next calls fail with a given error (what a storage outage or refusal looks like).
Every write stamps the entity's ``Timestamp`` (kept aside, as the SDK keeps it in metadata) from
``clock``, so timers that look for rows written long ago can be tested with a fake clock.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    ConnectorError,
    NotFoundError,
    StorageRejectedError,
)
from connector_core.ports import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPERATIONS,
    MAX_ENTITY_BYTES,
    MAX_PROPERTIES,
    MAX_PROPERTY_BYTES,
    Entity,
    TransactionOp,
    property_bytes,
    row_keys_per_query,
)

__all__ = ["InMemoryEntityStore", "InMemoryMessageQueue", "entity_bytes"]

_SYSTEM_PROPERTIES = 3  # PartitionKey, RowKey, Timestamp


def entity_bytes(entity: Entity) -> int:
    """An entity's stored size as Table Storage counts it: 4 bytes, plus per property 8 bytes,
    its name (UTF-16) and its value."""
    size = 4
    for name, value in entity.items():
        size += 8 + len(str(name).encode("utf-16-le")) + property_bytes(value)
    return size


def _rejected(code: str, detail: str, status: int = 400) -> StorageRejectedError:
    return StorageRejectedError(
        f"Storage refused the request ({status} {code}): {detail}", status=status, code=code
    )


def _check_entity(entity: Entity) -> None:
    if len(entity) + 1 > MAX_PROPERTIES:  # + Timestamp
        raise _rejected("TooManyProperties", "an entity holds at most 255 properties")
    for name, value in entity.items():
        if property_bytes(value) > MAX_PROPERTY_BYTES:
            raise _rejected("PropertyValueTooLarge", f"property {name} exceeds 64 KiB")
    if entity_bytes(entity) > MAX_ENTITY_BYTES:
        raise _rejected("EntityTooLarge", "an entity is at most 1 MiB")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class InMemoryEntityStore:
    def __init__(self, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._tables: dict[str, dict[tuple[str, str], tuple[dict[str, Any], str]]] = defaultdict(
            dict
        )
        self._written: dict[str, dict[tuple[str, str], datetime]] = defaultdict(dict)
        self.clock = clock
        self._lock = threading.RLock()
        self._faults: list[tuple[frozenset[str], ConnectorError]] = []
        self.operations = 0  # counted like billable table operations (round trips)

    @staticmethod
    def _key(entity: Entity) -> tuple[str, str]:
        return str(entity["PartitionKey"]), str(entity["RowKey"])

    def fail_next(
        self, error: ConnectorError, *, operations: Sequence[str] = (), count: int = 1
    ) -> None:
        """The next ``count`` calls of ``operations`` (method names; all when empty) raise
        ``error`` instead of touching the data."""
        with self._lock:
            self._faults += [(frozenset(operations), error)] * count

    def _enter(self, operation: str) -> None:
        """Count one round trip; raise an injected fault if one is due. Lock held."""
        self.operations += 1
        for index, (names, error) in enumerate(self._faults):
            if not names or operation in names:
                del self._faults[index]
                raise error

    def get_entity(
        self, table: str, partition_key: str, row_key: str
    ) -> tuple[dict[str, Any], str]:
        with self._lock:
            self._enter("get_entity")
            found = self._tables[table].get((partition_key, row_key))
            if found is None:
                raise NotFoundError(
                    f"No entity {partition_key}/{row_key} in table {table}.",
                    status=404,
                    code="ResourceNotFound",
                )
            return copy.deepcopy(found[0]), found[1]

    def _put(self, table: str, entity: Entity) -> str:
        etag = f'W/"{uuid.uuid4().hex}"'
        self._tables[table][self._key(entity)] = (copy.deepcopy(dict(entity)), etag)
        self._written[table][self._key(entity)] = self.clock()
        return etag

    def _check_create(self, table: str, entity: Entity) -> None:
        if self._key(entity) in self._tables[table]:
            raise ConflictError(
                f"The entity already exists in table {table}.",
                status=409,
                code="EntityAlreadyExists",
            )

    def _check_etag(self, table: str, key: tuple[str, str], etag: str | None) -> None:
        found = self._tables[table].get(key)
        if found is None:
            raise NotFoundError(
                f"No entity {key[0]}/{key[1]} in table {table}.",
                status=404,
                code="ResourceNotFound",
            )
        if etag is not None and etag != "*" and found[1] != etag:
            raise ConcurrencyConflictError(
                "The record was changed by someone else; read it again.",
                status=412,
                code="UpdateConditionNotSatisfied",
            )

    def create_entity(self, table: str, entity: Entity) -> str:
        with self._lock:
            self._enter("create_entity")
            _check_entity(entity)
            self._check_create(table, entity)
            return self._put(table, entity)

    def update_entity(self, table: str, entity: Entity, *, etag: str) -> str:
        with self._lock:
            self._enter("update_entity")
            _check_entity(entity)
            self._check_etag(table, self._key(entity), etag)
            return self._put(table, entity)

    def upsert_entity(self, table: str, entity: Entity) -> str:
        with self._lock:
            self._enter("upsert_entity")
            _check_entity(entity)
            return self._put(table, entity)

    def delete_entity(
        self, table: str, partition_key: str, row_key: str, *, etag: str | None = None
    ) -> None:
        with self._lock:
            self._enter("delete_entity")
            key = (partition_key, row_key)
            if key not in self._tables[table]:
                return
            self._check_etag(table, key, etag)
            del self._tables[table][key]
            self._written[table].pop(key, None)

    def list_entities(
        self,
        table: str,
        *,
        partition_key: str,
        row_keys: Sequence[str] | None = None,
        row_key_prefix: str | None = None,
        where: Mapping[str, str] | None = None,
    ) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            wanted = None if row_keys is None else set(row_keys)
            if wanted is not None and not wanted:
                return []
            # Round trips as the Azure adapter makes them: a filter holds 15 comparisons.
            per_query = row_keys_per_query(where, row_key_prefix)
            queries = 1 if wanted is None else -(-len(wanted) // per_query)
            for _ in range(queries):
                self._enter("list_entities")
            found = []
            for (pk, rk), (entity, etag) in sorted(self._tables[table].items()):
                if pk != partition_key:
                    continue
                if wanted is not None and rk not in wanted:
                    continue
                if row_key_prefix and not rk.startswith(row_key_prefix):
                    continue
                if where and any(entity.get(k) != v for k, v in where.items()):
                    continue
                found.append((copy.deepcopy(entity), etag))
            return found

    def iter_entities(
        self,
        table: str,
        *,
        partition_key: str,
        row_key_from: str = "",
        row_key_to: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        last: str | None = None
        while True:  # a page per round trip, each read under the lock as Azure would
            with self._lock:
                self._enter("list_entities")
                page = [
                    copy.deepcopy(entity)
                    for (pk, rk), (entity, _) in sorted(self._tables[table].items())
                    if pk == partition_key
                    and rk >= row_key_from
                    and (last is None or rk > last)
                    and (row_key_to is None or rk < row_key_to)
                ][:page_size]
            yield from page
            if len(page) < page_size:
                return
            last = str(page[-1]["RowKey"])

    def scan_entities(
        self,
        table: str,
        *,
        limit: int,
        row_key: str | None = None,
        written_before: datetime | None = None,
        less_than: Mapping[str, str] | None = None,
        start: str = "",
    ) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            self._enter("scan_entities")
            rows = sorted(self._tables[table].items())
            # From ``start`` on, then the beginning up to it (as the Azure adapter's two queries).
            ordered = [r for r in rows if r[0][0] >= start] + [r for r in rows if r[0][0] < start]
            found: list[tuple[dict[str, Any], str]] = []
            for key, (entity, etag) in ordered:
                if len(found) >= limit:
                    break
                if row_key is not None and key[1] != row_key:
                    continue
                if written_before is not None and not self._written[table][key] < written_before:
                    continue
                if less_than and not all(
                    isinstance(entity.get(name), str) and entity[name] < value
                    for name, value in less_than.items()
                ):
                    continue
                found.append((copy.deepcopy(entity), etag))
            return found

    def submit_transaction(self, table: str, ops: Sequence[TransactionOp]) -> list[str | None]:
        if not ops:
            return []
        with self._lock:
            self._enter("submit_transaction")
            partitions = {str(op.entity["PartitionKey"]) for op in ops}
            if len(partitions) > 1:
                raise _rejected(
                    "CommandsInBatchActOnDifferentPartitions", "a batch stays in one partition"
                )
            if len(ops) > MAX_BATCH_OPERATIONS:
                raise _rejected("InvalidInput", "a batch holds at most 100 operations")
            if sum(entity_bytes(op.entity) for op in ops) > MAX_BATCH_BYTES:
                raise _rejected("RequestBodyTooLarge", "a batch is at most 4 MiB", status=413)
            if len({self._key(op.entity) for op in ops}) < len(ops):
                raise _rejected("InvalidDuplicateRow", "an entity appears twice in the batch")
            for index, op in enumerate(ops):  # validate everything first: all or nothing
                try:
                    if op.kind != "delete":
                        _check_entity(op.entity)
                    if op.kind == "create":
                        self._check_create(table, op.entity)
                    elif op.kind in ("update", "delete"):
                        # A batch's delete of a missing row fails it (404), etag or not.
                        self._check_etag(table, self._key(op.entity), op.etag)
                except ConnectorError as error:
                    error.extra["operation"] = index
                    raise
            etags: list[str | None] = []
            for op in ops:
                if op.kind == "delete":
                    del self._tables[table][self._key(op.entity)]
                    self._written[table].pop(self._key(op.entity), None)
                    etags.append(None)
                else:
                    etags.append(self._put(table, op.entity))
            return etags

    def ping(self) -> None:
        return None

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every entity of every table (for privacy scans in tests)."""
        with self._lock:
            return {
                t: [copy.deepcopy(e) for e, _ in rows.values()] for t, rows in self._tables.items()
            }


class InMemoryMessageQueue:
    def __init__(self) -> None:
        self.queues: dict[str, deque[str]] = defaultdict(deque)
        self._lock = threading.Lock()

    def send_message(self, queue: str, body: str, *, visibility_timeout: int | None = None) -> None:
        with self._lock:
            self.queues[queue].append(body)
