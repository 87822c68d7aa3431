"""Shared fixtures: one Azurite per test session (in memory, free loopback ports)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.azurite import Azurite


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with Azurite() as instance:
        yield instance


@pytest.fixture(scope="session")
def storage_connection_string(azurite: Azurite) -> str:
    return azurite.connection_string
