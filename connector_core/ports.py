"""Ports: the small interfaces the use cases depend on. Adapters implement them.

Conventions (Azure SDK guidelines): keyword-only options; ``get_*`` raises ``NotFoundError``
when missing; ``list_*`` returns an empty list; ``delete_*`` is idempotent; a write with a stale
ETag raises ``ConcurrencyConflictError``; creating what exists raises ``ConflictError``; storage
that cannot be reached raises ``StorageUnavailableError``; a request storage refuses for good
(400-class other than 404/409/412) raises ``StorageRejectedError``. Errors carry ``status`` and
``code`` in ``extra``.

Azure Table Storage limits the adapters share (and the in-memory fake enforces, so unit tests
meet them too); the repositories keep every entity and batch inside them:

* an entity: at most ``MAX_ENTITY_BYTES`` (1 MiB) and ``MAX_PROPERTIES`` (255, the three system
  properties PartitionKey, RowKey and Timestamp included);
* a string property: at most ``MAX_PROPERTY_BYTES`` (64 KiB, stored as UTF-16: 32 K characters);
* an entity-group transaction: one partition, at most ``MAX_BATCH_OPERATIONS`` (100) operations
  and ``MAX_BATCH_BYTES`` (4 MiB) of payload;
* a query filter: at most ``MAX_FILTER_COMPARISONS`` (15) comparisons, so ``list_entities``
  reads at most ``MAX_ROW_KEYS_PER_QUERY`` row keys per round trip;
* a query page: at most 1000 entities; ``scan_entities`` (timers only, never a request path)
  reads at most ``MAX_SCAN_PAGES`` pages per call, so its work is bounded however large the
  table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_OPERATIONS",
    "MAX_ENTITY_BYTES",
    "MAX_FILTER_COMPARISONS",
    "MAX_PROPERTIES",
    "MAX_PROPERTY_BYTES",
    "MAX_QUERY_PAGE",
    "MAX_ROW_KEYS_PER_QUERY",
    "MAX_SCAN_PAGES",
    "Entity",
    "EntityStore",
    "MessageQueue",
    "TransactionOp",
    "property_bytes",
    "row_keys_per_query",
]

MAX_ENTITY_BYTES = 1024 * 1024
MAX_PROPERTY_BYTES = 64 * 1024
MAX_PROPERTIES = 255
MAX_BATCH_OPERATIONS = 100
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_FILTER_COMPARISONS = 15
MAX_ROW_KEYS_PER_QUERY = MAX_FILTER_COMPARISONS - 1  # one comparison names the partition
MAX_QUERY_PAGE = 1000
MAX_SCAN_PAGES = 20


def property_bytes(value: Any) -> int:
    """Stored size of a property value as Table Storage counts it (strings are UTF-16)."""
    if isinstance(value, str):
        return len(value.encode("utf-16-le"))
    if isinstance(value, bytes | bytearray):
        return len(value)
    return 8


def row_keys_per_query(where: Mapping[str, str] | None, row_key_prefix: str | None) -> int:
    """Row keys one ``list_entities`` filter names beside its other comparisons: the partition
    (already off ``MAX_ROW_KEYS_PER_QUERY``), each ``where`` equality, a prefix's two bounds."""
    return MAX_ROW_KEYS_PER_QUERY - len(where or {}) - (2 if row_key_prefix else 0)


# A table entity: PartitionKey, RowKey and simple typed properties (str, int, float, bool,
# datetime). Larger structures are stored as JSON strings by the repositories.
Entity = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TransactionOp:
    """One operation of an atomic batch within a single partition."""

    kind: Literal["create", "update", "upsert", "delete"]
    entity: Entity
    etag: str | None = None


class EntityStore(Protocol):
    """Table storage, one logical table per name, with ETag-based optimistic concurrency."""

    def get_entity(
        self, table: str, partition_key: str, row_key: str
    ) -> tuple[dict[str, Any], str]:
        """Return ``(entity, etag)``; ``NotFoundError`` when missing."""
        ...

    def create_entity(self, table: str, entity: Entity) -> str:
        """Insert; ``ConflictError`` if it exists. Returns the new ETag."""
        ...

    def update_entity(self, table: str, entity: Entity, *, etag: str) -> str:
        """Replace only if the stored ETag matches; ``ConcurrencyConflictError`` otherwise."""
        ...

    def upsert_entity(self, table: str, entity: Entity) -> str:
        """Insert or replace unconditionally. Returns the new ETag."""
        ...

    def delete_entity(
        self, table: str, partition_key: str, row_key: str, *, etag: str | None = None
    ) -> None:
        """Delete; idempotent when missing. With ``etag``: ``ConcurrencyConflictError`` if stale."""
        ...

    def list_entities(
        self,
        table: str,
        *,
        partition_key: str,
        row_keys: Sequence[str] | None = None,
        row_key_prefix: str | None = None,
        where: Mapping[str, str] | None = None,
    ) -> list[tuple[dict[str, Any], str]]:
        """``(entity, etag)`` pairs of one partition, in RowKey order (empty list when none):
        all of them, or only those whose RowKey is one of ``row_keys`` (read
        ``MAX_ROW_KEYS_PER_QUERY`` at a time), starts with ``row_key_prefix``, or whose string
        properties equal ``where``."""
        ...

    def iter_entities(
        self,
        table: str,
        *,
        partition_key: str,
        row_key_from: str = "",
        row_key_to: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Entities of one partition with ``row_key_from <= RowKey < row_key_to`` (no upper
        bound when None), in RowKey order, fetched ``page_size`` at a time as the caller
        iterates: a long range is never held in memory at once (reports stream with it)."""
        ...

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
        """At most ``limit`` ``(entity, etag)`` pairs across partitions (a filtered scan, for
        timers): whose RowKey is ``row_key``, last written (``Timestamp``) before
        ``written_before``, and whose string properties sort before ``less_than``'s values.
        In PartitionKey order from ``start``, wrapping around to the beginning (a random
        ``start`` spreads runs over the table); at most ``MAX_SCAN_PAGES`` round trips."""
        ...

    def submit_transaction(self, table: str, ops: Sequence[TransactionOp]) -> list[str | None]:
        """All-or-nothing batch within one partition. Raises as the failing op would.
        Returns each operation's new ETag (``None`` for a delete), in order."""
        ...

    def ping(self) -> None:
        """Cheap round trip to the service; ``StorageUnavailableError`` when unreachable."""
        ...


class MessageQueue(Protocol):
    """Storage queues with at-least-once delivery (consumed by queue-triggered functions)."""

    def send_message(
        self, queue: str, body: str, *, visibility_timeout: int | None = None
    ) -> None: ...
