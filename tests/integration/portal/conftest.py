"""Fixtures for the portal API tests over real HTTP.

Each module gets its own sandbox EHR instance (same client registration as the stack's), so its
FHIR base URL is unique: the portal's one-config-per-URL rule never collides with configs other
test packages create for the stack's own EHR. Configs created here are deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devtools.sandbox.ehr import SandboxEhr
from tests.stack import Stack, delete_configs_of, own_ehr

ADMIN = "admin@contosohealth.onmicrosoft.com"
APPROVER = "ehr.analyst@contosohealth.onmicrosoft.com"
FAB_ADMIN = "admin@fabrikamclinics.onmicrosoft.com"
FAB_APPROVER = "ehr.analyst@fabrikamclinics.onmicrosoft.com"


@pytest.fixture(scope="module")
def ehr(stack: Stack) -> Iterator[SandboxEhr]:
    with own_ehr(stack, "portal-test-ehr") as instance:
        yield instance


@pytest.fixture
def clean(stack: Stack, ehr: SandboxEhr) -> Iterator[None]:
    """No config for this module's EHR before or after the test."""
    delete_configs_of(stack, ehr.base_url)
    ehr.reset()
    yield
    delete_configs_of(stack, ehr.base_url)
    ehr.reset()


class PortalClient:
    """The portal front end's view: JSON calls with an Entra access token."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.entra = stack.sandbox.entra
        self.http = httpx.Client(base_url=stack.api, timeout=30.0)

    def token(self, upn: str = ADMIN, **kwargs: Any) -> str:
        return self.entra.mint_user_token(upn, **kwargs)

    def headers(
        self, upn: str | None = ADMIN, token: str | None = None, **extra: str
    ) -> dict[str, str]:
        headers = dict(extra)
        if token is None and upn is not None:
            token = self.token(upn)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        upn: str | None = ADMIN,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        return self.http.request(
            method, path, headers=self.headers(upn, token, **(headers or {})), **kwargs
        )

    def create(
        self, fhir_base_url: str, *, environment: str = "test", approver: str = APPROVER, **kw: Any
    ) -> httpx.Response:
        body = {"fhirBaseUrl": fhir_base_url, "approverUpn": approver, "environment": environment}
        return self.request("POST", "/configs", json=body, **kw)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def portal(stack: Stack, clean: None) -> Iterator[PortalClient]:
    client = PortalClient(stack)
    yield client
    client.close()
