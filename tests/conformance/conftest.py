"""Fixtures for the SMART conformance suite: the connector (session ``stack``) against
``oidc-provider``, an independent OpenID-certified authorization server, in front of a small
FHIR API whose base URL differs from the issuer (devtools/conformance).

The node process is started once for this package and always stopped. Each test gets the
server with its test hooks reset, and (``config``) an approved config of its own for the
server's FHIR base, removed afterwards (one config per FHIR URL and environment per tenant).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from connector_core.adapters.smart import normalize_fhir_base
from connector_core.domain.models import EhrUserMapping, Environment, TenantConfig, utcnow
from connector_core.domain.visit_keys import ehr_user_key
from devtools.conformance import ConformanceServer
from devtools.sandbox import seed
from tests.stack import Browser, Stack

# One-visit appointments of the sandbox seed (the conformance server serves the same data).
SOLO = "appt-6b1e0d34"  # prac-7f3a91c2 + pat-3c9e1f40, with an encounter
OTHER = "appt-93af2c6b"  # prac-c41d6a05 + pat-5e6f0c93, with an encounter
NEW_PATIENT = "appt-0c7d5e82"  # prac-2b8e4d17 + pat-8d2a7b61, no encounter
APPROVER = "ehr.analyst@contosohealth.onmicrosoft.com"
ADMIN = "admin@contosohealth.onmicrosoft.com"


@pytest.fixture(scope="package")
def conformance(stack: Stack) -> Iterator[ConformanceServer]:
    """oidc-provider + FHIR API in a node process for this package (stopped afterwards)."""
    with ConformanceServer(
        connector_url=stack.url,
        ca=stack.sandbox.tls,
        client_id=stack.sandbox.smart_client_id,
    ) as server:
        yield server
        _delete_configs(stack, server.fhir_base)


@pytest.fixture
def cs(conformance: ConformanceServer, fresh_stack: Stack) -> Iterator[ConformanceServer]:
    """The conformance server with its bad modes and recordings cleared before and after."""
    conformance.reset()
    yield conformance
    conformance.reset()


def _delete_configs(stack: Stack, fhir_base: str) -> None:
    container = stack.container()
    for tenant in stack.sandbox.entra.tenants:
        for versioned in container.configs.list(tenant):
            if versioned.record.fhir_base_url == fhir_base:
                container.configs.delete(tenant, versioned.record.id)
                container.launch_cache.forget_config(versioned.record.id)


def approved_config(
    stack: Stack,
    server: ConformanceServer,
    *,
    smart_client_id: str | None = None,
    environment: Environment = Environment.TEST,
) -> TenantConfig:
    """An approved config for the conformance FHIR base (a leftover of another test is removed
    first), written through the repository as ``stack.create_approved_config`` does."""
    container = stack.container()
    tid = stack.tenant(0).tid
    existing = container.configs.find_id_by_url(tid, environment.value, server.fhir_base)
    if existing is not None:
        container.configs.delete(tid, existing)
        container.launch_cache.forget_config(existing)
    config = stack.create_approved_config(fhir_base_url=server.fhir_base, environment=environment)
    if smart_client_id is not None:
        current = container.configs.get(tid, config.id)
        changed = current.record.model_copy(update={"smart_client_id": smart_client_id})
        container.configs.update(changed, expected=current)
        container.launch_cache.forget_config(config.id)
        config = changed
    return config


@pytest.fixture
def config(cs: ConformanceServer, fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = approved_config(fresh_stack, cs)
    yield created
    fresh_stack.container().configs.delete(created.tenant_id, created.id)
    fresh_stack.container().launch_cache.forget_config(created.id)


# --- EHR user mappings on this server's FHIR base ------------------------------------------------


def user_key(stack: Stack, server: ConformanceServer, practitioner_id: str) -> str:
    return ehr_user_key(
        stack.container().keyring,
        normalize_fhir_base(server.fhir_base),
        f"Practitioner/{practitioner_id}",
    )


def forget_mapping(stack: Stack, server: ConformanceServer, practitioner_id: str) -> None:
    key = user_key(stack, server, practitioner_id)
    stack.container().mappings.delete(key)
    stack.container().launch_cache.forget_mapping(key)


def set_mapping(stack: Stack, server: ConformanceServer, practitioner_id: str) -> None:
    """As if this clinician had signed in to Microsoft through this EHR before."""
    container = stack.container()
    key = user_key(stack, server, practitioner_id)
    now = utcnow()
    tid = stack.tenant(0).tid
    container.mappings.upsert(
        EhrUserMapping(
            ehr_user_key=key,
            region=container.settings.region,
            tenant_id=tid,
            entra_oid=stack.sandbox.entra.user_for_practitioner(practitioner_id).oid,
            entra_tid=tid,
            created_at=now,
            last_used_at=now,
        )
    )
    container.launch_cache.forget_mapping(key)


def practitioner_of(appointment_id: str) -> str:
    return seed.APPOINTMENTS[appointment_id].practitioner_id


# --- browsing by hand ----------------------------------------------------------------------------


def absolute(response: httpx.Response) -> str:
    return urljoin(str(response.url), response.headers["location"])


def walk_to_callback(
    browser: Browser, start: str, *, callback_path: str = "/api/launch/callback", limit: int = 12
) -> str:
    """With a browser that does not follow redirects: follow the launch through the connector
    and the authorization server (its interaction pages included) until the redirect into the
    connector's callback, which is returned undelivered."""
    url = start
    for _ in range(limit):
        response = browser.get(url)
        assert response.status_code in (302, 303), (url, response.status_code, response.text[:800])
        url = absolute(response)
        if urlsplit(url).path.endswith(callback_path):
            return url
    raise AssertionError(f"no redirect to {callback_path} within {limit} steps (last {url})")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def assert_error_page(response: httpx.Response, *statuses: int) -> None:
    """The connector's browser error page: the expected status, HTML, a correlation id, no
    stack trace, and never a 500."""
    assert response.status_code != 500, response.text[:800]
    assert response.status_code in statuses, (response.status_code, response.text[:800])
    assert response.headers["content-type"].startswith("text/html"), response.headers
    assert "Reference (correlation id)" in response.text, response.text[:800]
    assert response.headers.get("x-correlation-id")
    assert "Traceback" not in response.text


def is_entra_picker(response: httpx.Response) -> bool:
    return "/oauth2/v2.0/authorize" in str(response.url) and 'class="accounts"' in response.text
