"""Token forgery against every authenticated route, and oversized / malformed bodies, over real
HTTP through the local host with the sandbox Entra (its JWKS, its forged-token kinds).

Every route that takes a Bearer token is taken from the served OpenAPI document (so a route
added later is covered or this test fails), plus the clinician's participants view. Forged
tokens carry the admin role and the approver's name: if any were accepted it would be allowed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from devtools.sandbox.entra import FORGED_KINDS
from tests.e2e.launch.helpers import clinician_launch, drop_config, own_config, set_mapping
from tests.stack import Stack

pytestmark = pytest.mark.slow

ADMIN_ROLE = "Connector.Admin"
SOLO = "appt-6b1e0d34"
BODY_LIMIT = 64 * 1024  # functions/_http.py MAX_BODY_BYTES
PRESENCE_LIMIT = 4 * 1024 * 1024  # functions/presence.py MAX_NOTIFICATION_BODY


@dataclass
class Target:
    config: TenantConfig
    visit_key: str
    organizer_oid: str


@pytest.fixture(scope="module")
def target(stack: Stack) -> Iterator[Target]:
    """A config and a live visit of the stack's EHR (the clinician launched once)."""
    config = own_config(stack)
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    oid = stack.sandbox.entra.user_for_practitioner(practitioner).oid
    set_mapping(stack, practitioner, oid)
    landing = clinician_launch(stack, stack.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id
    key = stack.container().keyring.keyed_hash("visit", config.id, "appointment", SOLO)
    yield Target(config, key, oid)
    drop_config(stack, config)


def _claims(target: Target) -> dict[str, object]:
    return {
        "tid": target.config.tenant_id,
        "roles": [ADMIN_ROLE],
        "preferred_username": target.config.approver_upn,
        "oid": target.organizer_oid,
    }


def _portal_routes(stack: Stack) -> list[tuple[str, str]]:
    """(method, path) of every operation the OpenAPI document protects with a token."""
    with stack.http() as api:
        document = api.get("/openapi.json").json()
    default = document.get("security")
    routes = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if not isinstance(operation, dict):
                continue
            security = operation.get("security", default)
            if security:  # [] means anonymous
                routes.append((method.upper(), path))
    return routes


def _call(
    stack: Stack,
    target: Target,
    method: str,
    path: str,
    token: str | None,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    url = path.replace("{id}", target.config.id).replace("{visitKey}", target.visit_key)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if content is None and method in ("POST", "PUT"):
        content = json.dumps(
            {
                "fhirBaseUrl": target.config.fhir_base_url,
                "approverUpn": "someone.else@contoso.example",
                "environment": "test",
            }
        ).encode()
    if method in ("PUT", "DELETE") and "If-Match" not in sent:
        sent["If-Match"] = "*"
    with stack.http() as api:
        return api.request(method, url, content=content, headers=sent)


def test_every_route_refuses_every_forged_token(stack: Stack, target: Target) -> None:
    entra = stack.sandbox.entra
    routes = _portal_routes(stack)
    assert len(routes) >= 8, routes  # the document lists the portal's operations
    routes.append(("GET", "/visits/{visitKey}/participants"))
    failures = []
    for kind in FORGED_KINDS:
        token = entra.mint_forged_token(kind, **_claims(target))
        for method, path in routes:
            response = _call(stack, target, method, path, token)
            ok = (
                response.status_code == 401
                and response.headers["content-type"].startswith("application/problem+json")
                and response.json().get("correlationId")
            )
            if not ok:
                failures.append((kind, method, path, response.status_code, response.text[:120]))
    assert failures == []
    # nothing changed: the config is still there, approved, with its approver
    config = stack.container().configs.get(target.config.tenant_id, target.config.id).record
    assert config.status.value == "approved" and config.approver_upn == target.config.approver_upn


def test_a_correctly_signed_token_with_the_same_claims_is_accepted(
    stack: Stack, target: Target
) -> None:
    """The control: the refusals above come from the forgery, not from the claims."""
    token = stack.sandbox.entra.mint_access_token(**_claims(target))  # type: ignore[arg-type]
    assert _call(stack, target, "GET", "/configs/{id}", token).status_code == 200
    assert _call(stack, target, "GET", "/configs/{id}/history", token).status_code == 200
    view = _call(stack, target, "GET", "/visits/{visitKey}/participants", token)
    assert view.status_code == 200 and "participants" in view.json()


def test_participants_view_refuses_other_users_and_other_tenants(
    stack: Stack, target: Target
) -> None:
    entra = stack.sandbox.entra
    same_tenant_other_user = entra.mint_access_token(
        tid=target.config.tenant_id, oid="7d1f0000-0000-4000-8000-000000000001"
    )
    other_tenant = stack.tenant(1).tid
    other_tenant_same_oid = entra.mint_access_token(tid=other_tenant, oid=target.organizer_oid)
    path = "/visits/{visitKey}/participants"
    assert _call(stack, target, "GET", path, same_tenant_other_user).status_code == 403
    assert _call(stack, target, "GET", path, other_tenant_same_oid).status_code == 403
    # the other tenant's admin cannot see or change this tenant's config either
    admin_elsewhere = entra.mint_access_token(tid=other_tenant, roles=[ADMIN_ROLE])
    for method in ("GET", "PUT", "DELETE"):
        assert _call(stack, target, method, "/configs/{id}", admin_elsewhere).status_code == 404
    # no token, a non-Bearer scheme, garbage
    for header in (None, "Basic YTpi", "Bearer", "Bearer a.b.c", "Bearer " + "A" * 9000):
        with stack.http() as api:
            sent = {"Authorization": header} if header else {}
            key = target.visit_key
            assert api.get(f"/visits/{key}/participants", headers=sent).status_code == 401
            assert api.get(f"/configs/{target.config.id}", headers=sent).status_code == 401


# --- bodies ------------------------------------------------------------------------------------


def _admin(stack: Stack, target: Target) -> str:
    return stack.sandbox.entra.mint_access_token(
        tid=target.config.tenant_id, roles=[ADMIN_ROLE], preferred_username="admin@x.example"
    )


def _problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["correlationId"] and "Traceback" not in response.text


@pytest.mark.parametrize(("method", "path"), [("POST", "/configs"), ("PUT", "/configs/{id}")])
def test_portal_bodies_over_64_kib_are_413(
    stack: Stack, target: Target, method: str, path: str
) -> None:
    token = _admin(stack, target)
    at_limit = b'{"fhirBaseUrl":"' + b"a" * (BODY_LIMIT - 40) + b'"}'
    assert len(at_limit) <= BODY_LIMIT
    over = b'{"fhirBaseUrl":"' + b"a" * BODY_LIMIT + b'"}'
    _problem(_call(stack, target, method, path, token, content=over), 413)
    # just under the limit is read (and refused for what it says, not for its size)
    under = _call(stack, target, method, path, token, content=at_limit)
    assert under.status_code in (400, 412), under.text[:300]


@pytest.mark.parametrize("route", ["/presence", "/presence/lifecycle"])
def test_webhook_bodies_over_its_limit_are_413(stack: Stack, route: str) -> None:
    """Graph batches notifications, so the webhook's limit is 4 MiB (functions/presence.py)."""
    over = b'{"value":[],"pad":"' + b"a" * PRESENCE_LIMIT + b'"}'
    with stack.http() as api:
        response = api.post(route, content=over, headers={"Content-Type": "application/json"})
    _problem(response, 413)


MALFORMED = [
    b"",
    b"{",
    b"\xff\xfe\x00",
    b"[]",
    b"null",
    b'"text"',
    b"1e999999",
    b'{"fhirBaseUrl": 5, "approverUpn": [], "environment": {}}',
    b'{"value": 3}',
    b'{"value": [1, "x", null, {"subscriptionId": {"$ne": 1}}]}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 2000 + b"1" + b"}" * 2000,
]


@pytest.mark.parametrize("body", MALFORMED, ids=lambda b: repr(b[:16]))
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/configs"), ("PUT", "/configs/{id}"), ("POST", "/presence")],
)
@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/xml"])
def test_malformed_bodies_are_400_problems_never_500(
    stack: Stack, target: Target, method: str, path: str, body: bytes, content_type: str
) -> None:
    token = _admin(stack, target) if path.startswith("/configs") else None
    response = _call(
        stack, target, method, path, token, content=body, headers={"Content-Type": content_type}
    )
    if path == "/presence" and body.startswith(b'{"value": [1'):
        assert response.status_code == 202  # each bad item dropped, the batch acknowledged
        assert response.headers["x-dropped"] == "4"
        return
    _problem(response, 400)


@pytest.mark.parametrize(("method", "path"), [("POST", "/configs/{id}/ehr-signin")])
def test_actions_without_a_body_ignore_any_body(
    stack: Stack, target: Target, method: str, path: str
) -> None:
    """ehr-signin and approve take no body: whatever is sent is neither parsed nor a 5xx."""
    token = stack.sandbox.entra.mint_access_token(
        tid=target.config.tenant_id, preferred_username=target.config.approver_upn
    )
    for body in (b"{", b"\xff" * 100, b"a" * (BODY_LIMIT + 1)):
        response = _call(stack, target, method, path, token, content=body)
        assert response.status_code == 200, response.text[:200]
