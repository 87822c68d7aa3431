"""Azure Table and Queue storage adapters (Azurite locally, identity-based in Azure).

Retries: azure-core's exponential retry policy retries 408/429/500/502/503/504 and connection
errors (``retry_total`` tries, backoff from ``retry_backoff_factor`` seconds). Every client has
explicit connect/read timeouts. Tables and queues are created on first use, lazily: the first
operation that meets "table not found" creates it and retries once, so a warm path pays nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableServiceClient, TableTransactionError, UpdateMode

from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    NotFoundError,
    StorageUnavailableError,
)
from connector_core.ports import Entity, TransactionOp
from connector_core.settings import StorageSettings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.storage.queue import QueueServiceClient

__all__ = ["AzureMessageQueue", "AzureTableStore", "RetryOptions"]

T = TypeVar("T")


class RetryOptions:
    """Retry and timeout options shared by the storage clients (keyword-only)."""

    def __init__(
        self,
        *,
        retry_total: int = 3,
        retry_backoff_factor: float = 0.3,
        retry_backoff_max: float = 4.0,
        connection_timeout: float = 3.0,
        read_timeout: float = 10.0,
    ) -> None:
        self.kwargs: dict[str, Any] = {
            "retry_total": retry_total,
            "retry_backoff_factor": retry_backoff_factor,
            "retry_backoff_max": retry_backoff_max,
            "connection_timeout": connection_timeout,
            "read_timeout": read_timeout,
        }


def _credential(settings: StorageSettings) -> TokenCredential:
    # Imported here: azure.identity is only needed in Azure (identity-based connections).
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if settings.client_id:
        return ManagedIdentityCredential(client_id=settings.client_id)
    return DefaultAzureCredential()


def _translate(exc: AzureError, what: str) -> Exception:
    if isinstance(exc, ResourceModifiedError) or (
        isinstance(exc, HttpResponseError) and exc.status_code == 412
    ):
        return ConcurrencyConflictError(f"{what} was changed by someone else; read it again.")
    if isinstance(exc, ResourceExistsError):
        return ConflictError(f"{what} already exists.")
    if isinstance(exc, ResourceNotFoundError):
        return NotFoundError(f"{what} was not found.")
    if isinstance(exc, ClientAuthenticationError):
        return StorageUnavailableError(
            "Storage refused the connector's credentials; check CONNECTOR_STORAGE and the "
            "managed identity's role assignments."
        )
    return StorageUnavailableError(
        f"Storage is unavailable ({type(exc).__name__}); try again shortly."
    )


def _table_missing(exc: AzureError) -> bool:
    if getattr(exc, "status_code", None) != 404:
        return False
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    # Azurite answers an insert into a missing table with a bare 404 (no error code).
    return code in ("TableNotFound", None)


class AzureTableStore:
    """``EntityStore`` over Azure Table Storage / Azurite."""

    def __init__(
        self,
        settings: StorageSettings,
        *,
        retry: RetryOptions | None = None,
        service: TableServiceClient | None = None,
    ) -> None:
        options = (retry or RetryOptions()).kwargs
        if service is not None:
            self._service = service
        elif settings.connection_string is not None:
            self._service = TableServiceClient.from_connection_string(
                settings.connection_string.get_secret_value(), **options
            )
        else:
            assert settings.table_service_uri is not None
            self._service = TableServiceClient(
                endpoint=settings.table_service_uri, credential=_credential(settings), **options
            )
        self._created: set[str] = set()
        self._lock = threading.Lock()

    def _call(self, table: str, what: str, action: Callable[[Any], T]) -> T:
        client = self._service.get_table_client(table)
        try:
            return action(client)
        except AzureError as exc:
            if not _table_missing(exc):
                raise _translate(exc, what) from None
        try:
            self._service.create_table_if_not_exists(table)
            return action(client)
        except AzureError as exc:
            raise _translate(exc, what) from None

    def get_entity(
        self, table: str, partition_key: str, row_key: str
    ) -> tuple[dict[str, Any], str]:
        def action(client: Any) -> tuple[dict[str, Any], str]:
            entity = client.get_entity(partition_key, row_key)
            return dict(entity), str(entity.metadata["etag"])

        return self._call(table, "The record", action)

    def create_entity(self, table: str, entity: Entity) -> str:
        return self._call(table, "The record", lambda c: str(c.create_entity(dict(entity))["etag"]))

    def update_entity(self, table: str, entity: Entity, *, etag: str) -> str:
        return self._call(
            table,
            "The record",
            lambda c: str(
                c.update_entity(
                    dict(entity),
                    mode=UpdateMode.REPLACE,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                )["etag"]
            ),
        )

    def upsert_entity(self, table: str, entity: Entity) -> str:
        return self._call(
            table,
            "The record",
            lambda c: str(c.upsert_entity(dict(entity), mode=UpdateMode.REPLACE)["etag"]),
        )

    def delete_entity(
        self, table: str, partition_key: str, row_key: str, *, etag: str | None = None
    ) -> None:
        def action(client: Any) -> None:
            if etag is None:
                client.delete_entity(partition_key, row_key)
            else:
                client.delete_entity(
                    partition_key,
                    row_key,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                )

        try:
            self._call(table, "The record", action)
        except NotFoundError:
            return  # idempotent

    def list_entities(self, table: str, *, partition_key: str) -> list[tuple[dict[str, Any], str]]:
        def action(client: Any) -> list[tuple[dict[str, Any], str]]:
            query = client.query_entities("PartitionKey eq @pk", parameters={"pk": partition_key})
            return [(dict(e), str(e.metadata["etag"])) for e in query]

        try:
            return self._call(table, "The records", action)
        except NotFoundError:
            return []

    def submit_transaction(self, table: str, ops: Sequence[TransactionOp]) -> list[str | None]:
        batch: list[Any] = []
        for op in ops:
            entity = dict(op.entity)
            if op.kind == "create":
                batch.append(("create", entity))
            elif op.kind == "upsert":
                batch.append(("upsert", entity, {"mode": UpdateMode.REPLACE}))
            elif op.kind == "update":
                batch.append(
                    (
                        "update",
                        entity,
                        {
                            "mode": UpdateMode.REPLACE,
                            "etag": op.etag,
                            "match_condition": MatchConditions.IfNotModified,
                        },
                    )
                )
            else:
                options = (
                    {"etag": op.etag, "match_condition": MatchConditions.IfNotModified}
                    if op.etag
                    else {}
                )
                batch.append(("delete", entity, options))

        def action(client: Any) -> list[str | None]:
            try:
                results = client.submit_transaction(batch)
            except TableTransactionError as exc:
                code = str(getattr(exc, "error_code", ""))
                if code == "EntityAlreadyExists":
                    raise ConflictError("The record already exists.") from None
                if code in ("UpdateConditionNotSatisfied", "ConditionNotMet"):
                    raise ConcurrencyConflictError(
                        "The record was changed by someone else; read it again."
                    ) from None
                if code == "ResourceNotFound":
                    raise NotFoundError("The record was not found.") from None
                raise
            return [
                None if op.kind == "delete" else str(result.get("etag"))
                for op, result in zip(ops, results, strict=True)
            ]

        return self._call(table, "The record", action)

    def ping(self) -> None:
        try:
            next(
                iter(self._service.query_tables("TableName eq 'health'", results_per_page=1)), None
            )
        except AzureError as exc:
            raise _translate(exc, "Storage") from None


class AzureMessageQueue:
    """``MessageQueue`` over Azure Storage queues; bodies base64 as the Functions host expects."""

    def __init__(self, settings: StorageSettings, *, retry: RetryOptions | None = None) -> None:
        from azure.storage.queue import QueueServiceClient, TextBase64EncodePolicy

        options = (retry or RetryOptions()).kwargs
        self._policy = TextBase64EncodePolicy()
        self._service: QueueServiceClient
        if settings.connection_string is not None:
            self._service = QueueServiceClient.from_connection_string(
                settings.connection_string.get_secret_value(), **options
            )
        else:
            assert settings.queue_service_uri is not None
            self._service = QueueServiceClient(
                account_url=settings.queue_service_uri, credential=_credential(settings), **options
            )
        self._clients: dict[str, Any] = {}  # one QueueClient per queue, reused (hot path)

    def _client(self, queue: str) -> Any:
        client = self._clients.get(queue)
        if client is None:
            client = self._service.get_queue_client(queue, message_encode_policy=self._policy)
            self._clients[queue] = client
        return client

    def send_message(self, queue: str, body: str, *, visibility_timeout: int | None = None) -> None:
        client = self._client(queue)
        try:
            client.send_message(body, visibility_timeout=visibility_timeout)
            return
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise _translate(exc, "The queue message") from None
        try:
            client.create_queue()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise _translate(exc, "The queue") from None
        try:
            client.send_message(body, visibility_timeout=visibility_timeout)
        except AzureError as exc:
            raise _translate(exc, "The queue message") from None
