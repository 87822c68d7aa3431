"""The storage adapters' HTTP session, against real Azurite: the environment (proxy variables,
``no_proxy``) is read once per endpoint, not on every operation, and still applies."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from connector_core.adapters.azure_storage import AzureMessageQueue, AzureTableStore, RetryOptions
from connector_core.errors import StorageUnavailableError
from connector_core.settings import StorageSettings

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def settings(storage_connection_string: str) -> StorageSettings:
    return StorageSettings(connection_string=SecretStr(storage_connection_string))


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts this thread's reads of the proxy variables (``getproxies`` scans ``os.environ``).

    Only this thread's: the patch is process-wide, and servers or timers other tests left running
    (msal's and requests' own sessions read the environment on every call) would be counted too.
    """
    import requests.utils

    reads: list[int] = []
    original: Callable[[], Any] = requests.utils.getproxies  # type: ignore[attr-defined]
    test_thread = threading.get_ident()

    def counted() -> Any:
        if threading.get_ident() == test_thread:
            reads.append(1)
        return original()

    monkeypatch.setattr(requests.utils, "getproxies", counted)
    return reads


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_operations_read_the_environment_once_per_endpoint(
    settings: StorageSettings, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    reads = _counting(clean_proxy_env)
    store, queue = AzureTableStore(settings), AzureMessageQueue(settings)
    table = f"t{uuid.uuid4().hex[:12]}"
    for index in range(5):
        etag = store.create_entity(table, {"PartitionKey": "p", "RowKey": str(index), "A": "x"})
        entity, read_etag = store.get_entity(table, "p", str(index))
        assert entity["A"] == "x" and read_etag == etag
    for _ in range(3):
        queue.send_message("transport-test", "hello")
    # once for the table endpoint, once for the queue endpoint (their first operation), not
    # once or twice per operation as requests' Session.request does
    assert len(reads) == 2, len(reads)


def test_proxy_variables_still_apply_and_no_proxy_still_exempts(
    settings: StorageSettings, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    # A proxy nobody listens on: requests that go through it fail, fast (no retries).
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")
    no_retries = RetryOptions(retry_total=0, connection_timeout=2.0)
    proxied = AzureTableStore(settings, retry=no_retries)
    with pytest.raises(StorageUnavailableError):
        proxied.get_entity(f"t{uuid.uuid4().hex[:12]}", "p", "r")

    clean_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    exempt = AzureTableStore(settings, retry=no_retries)
    table = f"t{uuid.uuid4().hex[:12]}"
    exempt.create_entity(table, {"PartitionKey": "p", "RowKey": "r", "A": "x"})
    assert exempt.get_entity(table, "p", "r")[0]["A"] == "x"
