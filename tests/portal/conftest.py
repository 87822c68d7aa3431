"""Fixtures for the portal's pages over real HTTP and in headless Chromium.

Each module gets its own sandbox EHR server (same client registration as the stack's), so its
FHIR base URLs are unique and the one-config-per-URL rule never meets another package's
configs; configs made here are deleted afterwards, and every test starts signed out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from devtools._serve import ServerThread
from devtools.sandbox.ehr import SandboxEhr
from tests.portal.helpers import PortalUser
from tests.stack import Stack


@pytest.fixture(scope="module")
def ehr(stack: Stack) -> Iterator[SandboxEhr]:
    instance = SandboxEhr(
        connector_url=stack.url,
        smart_client_id=stack.sandbox.smart_client_id,
        connector_jwks_url=f"{stack.api}/.well-known/jwks.json",
    )
    with ServerThread(instance.app, name="portal-pages-ehr") as server:
        instance.set_base_url(server.url)
        yield instance
        delete_configs_of(stack, server.url)


def delete_configs_of(stack: Stack, base_url: str) -> None:
    container = stack.container()
    for tenant in stack.sandbox.entra.tenants:
        for versioned in container.configs.list(tenant):
            if versioned.record.fhir_base_url.startswith(base_url):
                container.configs.delete(tenant, versioned.record.id)


@pytest.fixture
def clean(stack: Stack, ehr: SandboxEhr) -> Iterator[None]:
    delete_configs_of(stack, ehr.base_url)
    stack.sandbox.reset()
    ehr.reset()
    yield
    delete_configs_of(stack, ehr.base_url)
    stack.sandbox.reset()
    ehr.reset()


@pytest.fixture
def person(stack: Stack, clean: None) -> Iterator[Callable[..., PortalUser]]:
    """``person(language=None)``: a new browser (own cookies), closed after the test."""
    opened: list[PortalUser] = []

    def open_browser(language: str | None = None) -> PortalUser:
        user = PortalUser(stack, language=language)
        opened.append(user)
        return user

    yield open_browser
    for user in opened:
        user.close()
