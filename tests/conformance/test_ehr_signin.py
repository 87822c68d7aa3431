"""The approver's EHR sign-in (SMART standalone launch) against oidc-provider, then approval,
through the portal API as the portal front end calls it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devtools.conformance import ConformanceServer
from devtools.sandbox import seed
from tests.conformance.conftest import ADMIN, APPROVER, query_of
from tests.stack import Stack

pytestmark = pytest.mark.slow

ANALYST = f"Practitioner/{seed.ANALYST_ID}"


class Portal:
    """JSON calls with Entra stand-in access tokens (admin or approver)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = httpx.Client(base_url=stack.api, timeout=30.0)

    def call(self, method: str, path: str, *, upn: str, **kwargs: Any) -> httpx.Response:
        token = self.stack.sandbox.entra.mint_user_token(upn)
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def create(self, fhir_base_url: str) -> str:
        response = self.call(
            "POST",
            "/configs",
            upn=ADMIN,
            json={"fhirBaseUrl": fhir_base_url, "approverUpn": APPROVER, "environment": "test"},
        )
        assert response.status_code == 201, response.text
        config_id: str = response.json()["id"]
        return config_id


@pytest.fixture
def portal(fresh_stack: Stack, cs: ConformanceServer) -> Iterator[Portal]:
    client = Portal(fresh_stack)
    _delete(fresh_stack, cs)
    yield client
    client.http.close()
    _delete(fresh_stack, cs)


def _delete(stack: Stack, cs: ConformanceServer) -> None:
    container = stack.container()
    tid = stack.tenant(0).tid
    existing = container.configs.find_id_by_url(tid, "test", cs.fhir_base)
    if existing is not None:
        container.configs.delete(tid, existing)


def test_approver_signs_in_to_the_ehr_then_approves(
    fresh_stack: Stack, cs: ConformanceServer, portal: Portal
) -> None:
    s = fresh_stack
    config_id = portal.create(cs.fhir_base)  # the portal probed the FHIR base's discovery

    started = portal.call("POST", f"/configs/{config_id}/ehr-signin", upn=APPROVER)
    assert started.status_code == 200, started.text
    authorize_url = started.json()["authorizeUrl"]
    assert authorize_url.startswith(f"{cs.issuer}/auth?")  # the issuer's, not the FHIR base's
    sent = query_of(authorize_url)
    assert sent["aud"] == cs.fhir_base and sent["code_challenge_method"] == "S256"
    assert set(sent["scope"].split()) == {"openid", "fhirUser"} and "launch" not in sent

    browser = s.browser()
    try:
        page = browser.get(authorize_url)
        assert cs.is_login_page(page), (page.status_code, page.text[:800])
        done = cs.submit_login(browser, page, ANALYST)
    finally:
        browser.close()
    assert done.status_code == 200, (done.status_code, done.text[:800], cs.token_requests())
    assert str(done.url) == f"{s.portal}?configId={config_id}&ehrSignin=ok"  # back on the portal
    assert "EHR sign-in complete" in done.text
    exchanges = [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]
    assert [r["status"] for r in exchanges] == [200]
    assert exchanges[0]["authMethod"] == "private_key_jwt"

    signed = portal.call("GET", f"/configs/{config_id}", upn=ADMIN).json()
    assert signed["ehrValidatedBy"] == APPROVER and signed["ehrValidatedAt"]

    approved = portal.call("POST", f"/configs/{config_id}/approve", upn=APPROVER)
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["status"] == "approved"
    records = {r["type"]: r for r in body["integrationRecords"]}
    assert records["provider"]["redirectUri"] == f"{s.api}/launch/callback"


def test_approver_signing_in_as_a_patient_is_refused(
    fresh_stack: Stack, cs: ConformanceServer, portal: Portal
) -> None:
    config_id = portal.create(cs.fhir_base)
    started = portal.call("POST", f"/configs/{config_id}/ehr-signin", upn=APPROVER)
    browser = fresh_stack.browser()
    try:
        page = browser.get(started.json()["authorizeUrl"])
        patient = f"Patient/{next(iter(seed.PATIENTS))}"
        done = cs.submit_login(browser, page, patient)
    finally:
        browser.close()
    assert done.status_code == 403, done.text[:800]
    assert "Reference (correlation id)" in done.text
    approve = portal.call("POST", f"/configs/{config_id}/approve", upn=APPROVER)
    assert approve.status_code == 409, approve.text
