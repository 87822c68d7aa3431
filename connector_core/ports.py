"""Ports: the small interfaces the use cases depend on. Adapters implement them.

Conventions (Azure SDK guidelines): keyword-only options; ``get_*`` raises ``NotFoundError``
when missing; ``list_*`` returns an empty list; ``delete_*`` is idempotent; a write with a stale
ETag raises ``ConcurrencyConflictError``; creating what exists raises ``ConflictError``; storage
that cannot be reached raises ``StorageUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["Entity", "EntityStore", "MessageQueue", "TransactionOp"]

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

    def list_entities(self, table: str, *, partition_key: str) -> list[tuple[dict[str, Any], str]]:
        """All ``(entity, etag)`` pairs of one partition (empty list when none)."""
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
