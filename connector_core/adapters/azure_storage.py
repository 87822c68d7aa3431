"""Azure Table and Queue storage adapters (Azurite locally, identity-based in Azure).

Retries: azure-core's exponential retry policy retries 408/429/500/502/503/504 and connection
errors (``retry_total`` tries, backoff from ``retry_backoff_factor`` seconds). Every client has
explicit connect/read timeouts. Tables and queues are created on first use, lazily: the first
operation that meets "table not found" creates it and retries once, so a warm path pays nothing.

Errors say what happened (``_translate``): each carries the HTTP ``status`` and the service's
error ``code`` in ``extra``. 412 (and the ``ConditionNotMet`` codes) is
``ConcurrencyConflictError``, 409 ``ConflictError``, 404 ``NotFoundError``; 408, 429, 5xx,
timeouts and connection errors are ``StorageUnavailableError`` (passing: retry); every other
400-class answer (``EntityTooLarge``, ``PropertyValueTooLarge``, ``InvalidInput``, a refused
credential, ...) is ``StorageRejectedError``: the same request will never succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.data.tables import TableServiceClient, TableTransactionError, UpdateMode
from requests.sessions import merge_setting
from requests.structures import CaseInsensitiveDict
from requests.utils import get_environ_proxies

from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    ConnectorError,
    NotFoundError,
    StorageRejectedError,
    StorageUnavailableError,
)
from connector_core.ports import (
    MAX_QUERY_PAGE,
    MAX_SCAN_PAGES,
    Entity,
    TransactionOp,
    row_keys_per_query,
)
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


# Session.request's arguments that Session.send does not take; the SDK leaves them unset.
_REQUEST_ONLY = ("params", "cookies", "files", "auth", "hooks", "json")


class _StorageSession(requests.Session):
    """A requests session for the storage SDK's fully prepared requests.

    ``Session.request`` re-reads the environment (proxy variables, ``no_proxy``, netrc, the CA
    bundle) and merges session cookies, auth and hooks on every call: about 0.3 ms of CPU per
    table or queue operation here, more than the SDK's own pipeline, and a launch makes three.
    This one prepares the request with the session's headers only (the SDK sends no cookies,
    auth objects or hooks; anything else goes the usual way) and reads the environment once per
    endpoint, with requests' own ``get_environ_proxies`` (``no_proxy`` honoured); the CA bundle
    is read when the transport is made. ``Session.send`` does the rest as usual. A change to
    those variables takes a restart, as a Functions app setting change does anyway.
    """

    _MAX_ENDPOINTS = 16  # a store talks to one or two endpoints; bounded regardless

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self._proxies: dict[str, dict[str, str]] = {}

    def request(  # type: ignore[override]
        self, method: str, url: str, *, headers: Any = None, data: Any = None, **kwargs: Any
    ) -> requests.Response:
        extras = {k: kwargs.pop(k) for k in _REQUEST_ONLY if k in kwargs}
        if any(value is not None for value in extras.values()):
            return super().request(method, url, headers=headers, data=data, **extras, **kwargs)
        prepared = requests.PreparedRequest()
        prepared.prepare(
            method=method,
            url=url,
            headers=merge_setting(headers, self.headers, dict_class=CaseInsensitiveDict),
            data=data,
        )
        proxies = kwargs.pop("proxies", None) or self._endpoint_proxies(url)
        return self.send(prepared, proxies=proxies, **kwargs)

    def _endpoint_proxies(self, url: str) -> dict[str, str]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        found = self._proxies.get(origin)
        if found is None:
            found = get_environ_proxies(url)
            if len(self._proxies) < self._MAX_ENDPOINTS:
                self._proxies[origin] = found
        return found


def _storage_transport() -> RequestsTransport:
    """azure-core's requests transport (its adapter, retries off, error mapping) over
    ``_StorageSession``."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    session = _StorageSession()
    transport = RequestsTransport(
        session=session,
        session_owner=True,
        use_env_settings=False,
        connection_verify=bundle or True,
    )
    transport._init_session(session)  # what it does to a session it makes itself
    return transport


def _credential(settings: StorageSettings) -> TokenCredential:
    # Imported here: azure.identity is only needed in Azure (identity-based connections).
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if settings.client_id:
        return ManagedIdentityCredential(client_id=settings.client_id)
    return DefaultAzureCredential()


_CONFLICT_CODES = frozenset({"UpdateConditionNotSatisfied", "ConditionNotMet"})
_TRANSIENT_STATUSES = frozenset({408, 429})


def _status_and_code(exc: AzureError) -> tuple[int | None, str | None]:
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    return (status if isinstance(status, int) else None), (str(code) if code else None)


def _translate(exc: AzureError, what: str) -> ConnectorError:
    """The named error for a storage failure, keeping its status and error code."""
    status, code = _status_and_code(exc)
    extra: dict[str, object] = {"status": status, "code": code}
    index = getattr(exc, "index", None)
    if isinstance(exc, TableTransactionError) and isinstance(index, int):
        extra["operation"] = index  # which operation of the batch failed
    if isinstance(exc, ResourceModifiedError) or status == 412 or code in _CONFLICT_CODES:
        return ConcurrencyConflictError(
            f"{what} was changed by someone else; read it again.", **extra
        )
    if isinstance(exc, ResourceExistsError) or status == 409:
        return ConflictError(f"{what} already exists.", **extra)
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return NotFoundError(f"{what} was not found.", **extra)
    if status is None or status >= 500 or status in _TRANSIENT_STATUSES:
        if isinstance(exc, ClientAuthenticationError):
            # No HTTP answer: the identity could not get a token (passing, or a setup issue).
            return StorageUnavailableError(
                "Storage refused the connector's credentials; check CONNECTOR_STORAGE and the "
                "managed identity's role assignments.",
                **extra,
            )
        return StorageUnavailableError(
            f"Storage is unavailable ({status or type(exc).__name__}); try again shortly.",
            **extra,
        )
    if status in (401, 403):
        return StorageRejectedError(
            f"Storage refused the connector's credentials ({status} {code or '-'}); check "
            "CONNECTOR_STORAGE and the managed identity's role assignments.",
            **extra,
        )
    return StorageRejectedError(
        f"Storage refused the request ({status} {code or '-'}); it cannot succeed as sent.",
        **extra,
    )


def _table_missing(exc: AzureError) -> bool:
    if getattr(exc, "status_code", None) != 404:
        return False
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    # Azurite answers an insert into a missing table with a bare 404 (no error code).
    return code in ("TableNotFound", None)


def _queries(
    partition_key: str,
    row_keys: Sequence[str] | None,
    row_key_prefix: str | None,
    where: Mapping[str, str] | None,
) -> list[tuple[str, dict[str, Any]]]:
    """OData filters (with parameters) for ``list_entities``; several when ``row_keys`` needs
    more comparisons than one filter may hold (15)."""
    base = "PartitionKey eq @pk"
    parameters: dict[str, Any] = {"pk": partition_key}
    for index, (name, value) in enumerate(sorted((where or {}).items())):
        if not name.isidentifier():
            raise ValueError(f"not a property name: {name!r}")
        base += f" and {name} eq @w{index}"
        parameters[f"w{index}"] = value
    if row_key_prefix:
        upper = row_key_prefix[:-1] + chr(ord(row_key_prefix[-1]) + 1)
        base += " and RowKey ge @lo and RowKey lt @hi"
        parameters.update(lo=row_key_prefix, hi=upper)
    if row_keys is None:
        return [(base, parameters)]
    keys = sorted(set(row_keys))
    per_query = row_keys_per_query(where, row_key_prefix)
    queries = []
    for start in range(0, len(keys), per_query):
        chunk = keys[start : start + per_query]
        names = {f"r{i}": key for i, key in enumerate(chunk)}
        any_of = " or ".join(f"RowKey eq @{name}" for name in names)
        # Spaces around the parentheses: the SDK finds parameters by splitting on spaces.
        queries.append((f"{base} and ( {any_of} )", {**parameters, **names}))
    return queries


def _scan_queries(
    row_key: str | None,
    written_before: datetime | None,
    less_than: Mapping[str, str] | None,
    start: str,
) -> list[tuple[str, dict[str, Any]]]:
    """OData filters for ``scan_entities``: from ``start`` to the end, then the beginning up to
    ``start`` (one query when there is no ``start``)."""
    parts: list[str] = []
    parameters: dict[str, Any] = {}
    if row_key is not None:
        parts.append("RowKey eq @rk")
        parameters["rk"] = row_key
    if written_before is not None:
        parts.append("Timestamp lt @ts")  # the SDK writes a datetime as datetime'...'
        parameters["ts"] = written_before
    for index, (name, value) in enumerate(sorted((less_than or {}).items())):
        if not name.isidentifier():
            raise ValueError(f"not a property name: {name!r}")
        parts.append(f"{name} lt @l{index}")
        parameters[f"l{index}"] = value
    if not start:
        return [(" and ".join(parts), parameters)]
    parameters["start"] = start
    return [
        (" and ".join([*parts, "PartitionKey ge @start"]), parameters),
        (" and ".join([*parts, "PartitionKey lt @start"]), parameters),
    ]


# --- entity-group transactions, written and read here -------------------------------------------
#
# The SDK's ``submit_transaction`` prepares every operation through its policies on a thread
# pool and parses the answer with the e-mail package: about 5 ms of CPU for a two-row batch
# here, three times a single-row write, which made the batch (the presence worker's one
# transaction per visit and batch) its largest cost. The OData $batch format is small and
# documented ("Performing entity group transactions"); this writes it exactly as the SDK does
# (tests/integration/test_repositories.py runs both against Azurite) and sends it through the
# table client's own pipeline, so authentication, retries and timeouts stay the SDK's.

_STATUS_LINE = re.compile(r"^HTTP/1\.1 (\d{3})", re.MULTILINE)
_ETAG_HEADER = re.compile(r"^ETag:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)
_API_VERSION = "2019-02-02"


def _key_url(table_url: str, entity: Entity) -> str:
    def key(value: Any) -> str:
        return quote(str(value).replace("'", "''"), safe="")

    return (
        f"{table_url}(PartitionKey='{key(entity['PartitionKey'])}',"
        f"RowKey='{key(entity['RowKey'])}')"
    )


def _batch_part(index: int, op: TransactionOp, table_url: str) -> str:
    headers = ["Content-Type: application/json", "Accept: application/json;odata=minimalmetadata"]
    body = json.dumps(dict(op.entity), separators=(",", ":"))
    if op.kind == "create":
        line = f"POST {table_url} HTTP/1.1"
        headers.append("Prefer: return-no-content")
    elif op.kind == "delete":
        line = f"DELETE {_key_url(table_url, op.entity)} HTTP/1.1"
        headers.append(f"If-Match: {op.etag or '*'}")
        body = ""
    else:  # update (If-Match) or upsert (insert or replace)
        line = f"PUT {_key_url(table_url, op.entity)} HTTP/1.1"
        if op.kind == "update":
            headers.append(f"If-Match: {op.etag}")
    data = body.encode()
    headers += [
        f"Content-Length: {len(data)}",
        f"x-ms-version: {_API_VERSION}",
        "DataServiceVersion: 3.0",
    ]
    return (
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        f"Content-ID: {index}\r\n\r\n{line}\r\n" + "\r\n".join(headers) + f"\r\n\r\n{body}\r\n"
    )


def _batch_error(status: int, text: str, *, in_batch: bool) -> HttpResponseError:
    """The SDK's error for a refused batch (or one of its operations), status and code kept."""
    code = message = None
    start = text.find("{")
    if start >= 0:
        with contextlib.suppress(ValueError):
            error = json.loads(text[start : text.rfind("}") + 1]).get("odata.error", {})
            code = error.get("code")
            message = (error.get("message") or {}).get("value")
    detail = message or f"The batch was answered {status}."
    failure: HttpResponseError = (
        TableTransactionError(message=detail) if in_batch else HttpResponseError(message=detail)
    )
    failure.status_code = status
    setattr(failure, "error_code", code)  # noqa: B010 - as the SDK's errors carry it
    return failure


def _lean_batch_fits(client: Any) -> bool:
    """The table client exposes the pipeline this relies on, and its URL carries no SAS token
    (which the SDK's own batch would have to place); otherwise the SDK's batch is used."""
    return callable(getattr(getattr(client, "_client", None), "send_request", None)) and (
        "?" not in str(getattr(client, "url", "?"))
    )


def _lean_batch(client: Any, table: str, ops: Sequence[TransactionOp]) -> list[str | None]:
    if len({str(op.entity["PartitionKey"]) for op in ops}) > 1:
        raise _batch_error(
            400,
            '{"odata.error":{"code":"CommandsInBatchActOnDifferentPartitions",'
            '"message":{"value":"0:A batch stays within one partition."}}}',
            in_batch=True,
        )
    table_url = f"{client.url.rstrip('/')}/{quote(table)}"
    batch, changeset = f"batch_{uuid.uuid4()}", f"changeset_{uuid.uuid4()}"
    body = (
        f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
        + "".join(f"--{changeset}\r\n{_batch_part(i, op, table_url)}" for i, op in enumerate(ops))
        + f"--{changeset}--\r\n\r\n--{batch}--\r\n"
    )
    request = HttpRequest(
        "POST",
        f"{client.url.rstrip('/')}/$batch",
        headers={
            "x-ms-version": _API_VERSION,
            "DataServiceVersion": "3.0",
            "MaxDataServiceVersion": "3.0;NetFx",
            "Content-Type": f"multipart/mixed; boundary={batch}",
            "Accept": "application/json",
        },
        content=body.encode(),
    )
    response = client._client.send_request(request, stream=True)  # as the SDK's own batch
    text = response.read().decode("utf-8", errors="replace")
    if response.status_code != 202:
        raise _batch_error(response.status_code, text, in_batch=False)
    parts = _STATUS_LINE.split(text)[1:]  # [status, rest, status, rest, ...]
    statuses = [int(s) for s in parts[0::2]]
    for status, rest in zip(statuses, parts[1::2], strict=True):
        if not 200 <= status < 300:
            raise _batch_error(status, rest, in_batch=True)
    if len(statuses) != len(ops):
        raise HttpResponseError(message="The batch answer does not match the batch.")
    etags: list[str | None] = []
    for op, rest in zip(ops, parts[1::2], strict=True):
        found = _ETAG_HEADER.search(rest.split("\r\n\r\n", 1)[0])
        etags.append(None if op.kind == "delete" or found is None else found.group(1))
    return etags


class AzureTableStore:
    """``EntityStore`` over Azure Table Storage / Azurite."""

    def __init__(
        self,
        settings: StorageSettings,
        *,
        retry: RetryOptions | None = None,
        service: TableServiceClient | None = None,
    ) -> None:
        options = {**(retry or RetryOptions()).kwargs, "transport": _storage_transport()}
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
        self._clients: dict[str, Any] = {}  # one TableClient per table, reused (hot path)
        self._lock = threading.Lock()

    def _client(self, table: str) -> Any:
        client = self._clients.get(table)
        if client is None:
            with self._lock:
                client = self._clients.setdefault(table, self._service.get_table_client(table))
        return client

    def _call(self, table: str, what: str, action: Callable[[Any], T]) -> T:
        client = self._client(table)
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

    def list_entities(
        self,
        table: str,
        *,
        partition_key: str,
        row_keys: Sequence[str] | None = None,
        row_key_prefix: str | None = None,
        where: Mapping[str, str] | None = None,
    ) -> list[tuple[dict[str, Any], str]]:
        queries = _queries(partition_key, row_keys, row_key_prefix, where)

        def action(client: Any) -> list[tuple[dict[str, Any], str]]:
            found: list[tuple[dict[str, Any], str]] = []
            for text, parameters in queries:
                query = client.query_entities(text, parameters=parameters)
                found += [(dict(e), str(e.metadata["etag"])) for e in query]
            if len(queries) > 1:
                found.sort(key=lambda pair: str(pair[0]["RowKey"]))
            return found

        if not queries:
            return []
        try:
            return self._call(table, "The records", action)
        except NotFoundError:
            return []

    def iter_entities(
        self,
        table: str,
        *,
        partition_key: str,
        row_key_from: str = "",
        row_key_to: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        text = "PartitionKey eq @pk and RowKey ge @lo"
        parameters: dict[str, Any] = {"pk": partition_key, "lo": row_key_from}
        if row_key_to is not None:
            text += " and RowKey lt @hi"
            parameters["hi"] = row_key_to
        client = self._client(table)
        pages = client.query_entities(
            text, parameters=parameters, results_per_page=page_size
        ).by_page()
        while True:  # one page per round trip, as the caller iterates
            try:
                page = list(next(pages))
            except StopIteration:
                return
            except AzureError as exc:
                if _table_missing(exc):
                    return  # no table yet: nothing was ever written
                raise _translate(exc, "The records") from None
            for entity in page:
                yield dict(entity)

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
        queries = _scan_queries(row_key, written_before, less_than, start)

        def action(client: Any) -> list[tuple[dict[str, Any], str]]:
            found: list[tuple[dict[str, Any], str]] = []
            pages = 0
            for text, parameters in queries:
                # A filtered scan may answer empty pages (with a continuation) while it walks
                # the table: pages are bounded as well as results.
                query = client.query_entities(
                    text, parameters=parameters, results_per_page=min(limit, MAX_QUERY_PAGE)
                )
                for page in query.by_page():
                    pages += 1
                    for entity in page:
                        found.append((dict(entity), str(entity.metadata["etag"])))
                        if len(found) >= limit:
                            return found
                    if pages >= MAX_SCAN_PAGES:
                        return found
            return found

        if limit <= 0:
            return []
        try:
            return self._call(table, "The records", action)
        except NotFoundError:
            return []

    def submit_transaction(self, table: str, ops: Sequence[TransactionOp]) -> list[str | None]:
        if not ops:
            return []
        if all(isinstance(v, str) for op in ops for v in op.entity.values()) and _lean_batch_fits(
            self._client(table)
        ):
            # The repositories' rows (string properties only): the batch is written and read
            # here, a few times cheaper in CPU than the SDK's (see ``_lean_batch``).
            return self._call(table, "The record", lambda c: _lean_batch(c, table, ops))
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
            results = client.submit_transaction(batch)
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

        options = {**(retry or RetryOptions()).kwargs, "transport": _storage_transport()}
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
