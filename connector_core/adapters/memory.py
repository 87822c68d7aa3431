"""In-memory fakes of the storage ports, with the same semantics as the Azure adapters.

Used by unit tests and anywhere a process needs storage without Azurite. Thread-safe.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any

from connector_core.errors import ConcurrencyConflictError, ConflictError, NotFoundError
from connector_core.ports import Entity, TransactionOp

__all__ = ["InMemoryEntityStore", "InMemoryMessageQueue"]


class InMemoryEntityStore:
    def __init__(self) -> None:
        self._tables: dict[str, dict[tuple[str, str], tuple[dict[str, Any], str]]] = defaultdict(
            dict
        )
        self._lock = threading.RLock()
        self.operations = 0  # counted like billable table operations

    @staticmethod
    def _key(entity: Entity) -> tuple[str, str]:
        return str(entity["PartitionKey"]), str(entity["RowKey"])

    def get_entity(
        self, table: str, partition_key: str, row_key: str
    ) -> tuple[dict[str, Any], str]:
        with self._lock:
            self.operations += 1
            found = self._tables[table].get((partition_key, row_key))
            if found is None:
                raise NotFoundError(f"No entity {partition_key}/{row_key} in table {table}.")
            return copy.deepcopy(found[0]), found[1]

    def _put(self, table: str, entity: Entity) -> str:
        etag = f'W/"{uuid.uuid4().hex}"'
        self._tables[table][self._key(entity)] = (copy.deepcopy(dict(entity)), etag)
        return etag

    def _check_create(self, table: str, entity: Entity) -> None:
        if self._key(entity) in self._tables[table]:
            raise ConflictError(f"The entity already exists in table {table}.")

    def _check_etag(self, table: str, key: tuple[str, str], etag: str | None) -> None:
        found = self._tables[table].get(key)
        if found is None:
            raise NotFoundError(f"No entity {key[0]}/{key[1]} in table {table}.")
        if etag is not None and etag != "*" and found[1] != etag:
            raise ConcurrencyConflictError("The record was changed by someone else; read it again.")

    def create_entity(self, table: str, entity: Entity) -> str:
        with self._lock:
            self.operations += 1
            self._check_create(table, entity)
            return self._put(table, entity)

    def update_entity(self, table: str, entity: Entity, *, etag: str) -> str:
        with self._lock:
            self.operations += 1
            self._check_etag(table, self._key(entity), etag)
            return self._put(table, entity)

    def upsert_entity(self, table: str, entity: Entity) -> str:
        with self._lock:
            self.operations += 1
            return self._put(table, entity)

    def delete_entity(
        self, table: str, partition_key: str, row_key: str, *, etag: str | None = None
    ) -> None:
        with self._lock:
            self.operations += 1
            key = (partition_key, row_key)
            if key not in self._tables[table]:
                return
            self._check_etag(table, key, etag)
            del self._tables[table][key]

    def list_entities(self, table: str, *, partition_key: str) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            self.operations += 1
            return [
                (copy.deepcopy(entity), etag)
                for (pk, _), (entity, etag) in sorted(self._tables[table].items())
                if pk == partition_key
            ]

    def submit_transaction(self, table: str, ops: Sequence[TransactionOp]) -> list[str | None]:
        with self._lock:
            self.operations += 1
            partitions = {str(op.entity["PartitionKey"]) for op in ops}
            if len(partitions) > 1:
                raise ValueError("A transaction must stay within one partition.")
            for op in ops:  # validate everything first: all or nothing
                if op.kind == "create":
                    self._check_create(table, op.entity)
                elif op.kind in ("update", "delete") and (op.kind == "update" or op.etag):
                    self._check_etag(table, self._key(op.entity), op.etag)
            etags: list[str | None] = []
            for op in ops:
                if op.kind == "delete":
                    self._tables[table].pop(self._key(op.entity), None)
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
