"""One local host serving the fixture app (HTTP, queue and timer triggers) for this package."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from devtools.azurite import Azurite
from devtools.host import LocalHost
from tests.integration.host import fixture_app

HOST_JSON = {
    "version": "2.0",
    "extensions": {
        "queues": {
            "maxDequeueCount": 3,
            "visibilityTimeout": "00:00:00",
            "maxPollingInterval": "00:00:00.200",
            "batchSize": 4,
        }
    },
}


@pytest.fixture(scope="package")
def host(azurite: Azurite) -> Iterator[LocalHost]:
    previous = os.environ.get(fixture_app.STORAGE_SETTING)
    os.environ[fixture_app.STORAGE_SETTING] = azurite.connection_string
    try:
        with LocalHost(fixture_app.app, host_json=HOST_JSON) as instance:
            yield instance
    finally:
        if previous is None:
            os.environ.pop(fixture_app.STORAGE_SETTING, None)
        else:
            os.environ[fixture_app.STORAGE_SETTING] = previous


@pytest.fixture
def client(host: LocalHost) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=host.url, timeout=10) as http:
        yield http
