"""Schema-driven fuzzing of the portal API (schemathesis over the served OpenAPI document).

Every operation of ``GET /api/openapi.json`` is called through the local host with generated
valid and invalid inputs (examples, coverage and fuzzing phases). Checks: no 5xx, status codes,
content types, headers and bodies conform to the document, invalid input is rejected, auth is
enforced. Path ids are real config ids for part of the cases, so the deeper code paths (PUT,
approve, EHR sign-in) run too. ``positive_data_acceptance`` is left out on purpose: a
schema-valid ``fhirBaseUrl`` is still refused (400) when the EHR behind it fails the URL checks.

Outbound calls stay local: the FHIR probe uses a resolver that knows only loopback names, so a
generated host name is "not found" instead of a DNS query to the internet.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from connector_core.adapters.fhir_probe import FhirProbe
from devtools.sandbox.ehr import SandboxEhr
from tests.integration.portal.conftest import ADMIN, APPROVER, PortalClient
from tests.stack import Stack

_LOOPBACK_NAMES = {"127.0.0.1", "localhost"}


def _offline_resolver(host: str, port: int, *args: Any) -> Any:
    if host in _LOOPBACK_NAMES:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    raise socket.gaierror(socket.EAI_NONAME, "not resolved in the fuzz run")


@pytest.fixture(scope="module")
def fuzz_ids(stack: Stack, ehr: SandboxEhr) -> Iterator[list[str]]:
    """Two real configs (test + production) the generated cases may hit."""
    client = PortalClient(stack)
    ids = []
    for environment in ("test", "production"):
        response = client.create(ehr.fhir_base, environment=environment)
        assert response.status_code in (201, 409), response.text
        ids.append(response.json().get("id") or response.json()["existingId"])
    yield ids
    client.close()


@pytest.fixture(scope="module")
def portal_schema(stack: Stack, ehr: SandboxEhr, fuzz_ids: list[str]) -> Any:
    stack.container().fhir_probe = FhirProbe(dev_mode=True, resolver=_offline_resolver)
    _mint["token"] = stack.sandbox.entra.mint_user_token
    return schemathesis.openapi.from_url(f"{stack.api}/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def _restore_probe(stack: Stack) -> Iterator[None]:
    container = stack.container()
    saved = container.fhir_probe
    yield
    container.fhir_probe = saved


schema = schemathesis.pytest.from_fixture("portal_schema")
_mint: dict[str, Callable[[str], str]] = {}


@schema.auth(refresh_interval=None, retry_on=[])
class PortalAuth:
    """A fresh Entra token per case: the approver for EHR sign-in and approval, else an admin."""

    def get(self, case: Any, context: Any) -> str:
        user = APPROVER if case.operation.path.endswith(("/ehr-signin", "/approve")) else ADMIN
        return _mint["token"](user)

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def _pick(generated: str, ids: list[str]) -> str:
    """Deterministically replace about two thirds of generated ids by real ones."""
    bucket = int(hashlib.sha256(generated.encode()).hexdigest(), 16) % 3
    return ids[bucket] if bucket < len(ids) else generated


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_portal_api_fuzz(case: Any, stack: Stack, ehr: SandboxEhr, fuzz_ids: list[str]) -> None:
    meta = getattr(case, "_meta", None)
    positive = meta is None or str(meta.generation.mode) == "positive"
    if positive and case.path_parameters and "id" in case.path_parameters:
        generated = str(case.path_parameters["id"])
        config_id = _pick(generated, fuzz_ids)
        # assigned (not mutated in place) so schemathesis re-validates the changed component
        case.path_parameters = {**case.path_parameters, "id": config_id}
        if (
            config_id in fuzz_ids
            and case.method.upper() in ("PUT", "DELETE")
            and len(generated) % 2
        ):
            # half of these carry the current ETag, so the write paths run too
            client = PortalClient(stack)
            current = client.request("GET", f"/configs/{config_id}")
            client.close()
            if current.status_code == 200:
                case.headers = {**(case.headers or {}), "If-Match": current.headers["etag"]}
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=30)
    if case.method.upper() == "DELETE" and response.status_code == 204:
        _recreate(stack, ehr, fuzz_ids)


def _recreate(stack: Stack, ehr: SandboxEhr, ids: list[str]) -> None:
    """A fuzzed DELETE removed one of the real configs: register it again (same list slot)."""
    client = PortalClient(stack)
    try:
        for index, environment in enumerate(("test", "production")):
            response = client.create(ehr.fhir_base, environment=environment)
            if response.status_code == 201:
                ids[index] = response.json()["id"]
    finally:
        client.close()
