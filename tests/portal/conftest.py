"""Fixtures for the portal's pages over real HTTP and in headless Chromium.

Each module gets its own sandbox EHR server (same client registration as the stack's), so its
FHIR base URLs are unique and the one-config-per-URL rule never meets another package's
configs; configs made here are deleted afterwards, and every test starts signed out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from devtools.sandbox.ehr import SandboxEhr
from tests.portal.helpers import PortalUser
from tests.stack import Stack, delete_configs_of, own_ehr


@pytest.fixture(scope="module")
def ehr(stack: Stack) -> Iterator[SandboxEhr]:
    with own_ehr(stack, "portal-pages-ehr") as instance:
        yield instance


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
