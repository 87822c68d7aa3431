"""Shared fixtures: one Azurite per session (in memory, free loopback ports) and the full stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.azurite import Azurite
from tests.stack import Stack, running_stack


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with Azurite() as instance:
        yield instance


@pytest.fixture(scope="session")
def storage_connection_string(azurite: Azurite) -> str:
    return azurite.connection_string


@pytest.fixture(scope="session")
def stack(azurite: Azurite) -> Iterator[Stack]:
    """Azurite + sandbox (EHR, Entra, Graph) + the connector on the local host, for the session."""
    with running_stack(azurite) as running:
        yield running


@pytest.fixture
def fresh_stack(stack: Stack) -> Iterator[Stack]:
    """The session stack with the sandbox's faults and test hooks cleared before and after."""
    stack.sandbox.reset()
    yield stack
    stack.sandbox.reset()
