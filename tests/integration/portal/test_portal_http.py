"""Every portal route over real HTTP through the local host, with the sandbox EHR and Entra
stand-in: happy paths, token failures, roles, tenant isolation, concurrency, duplicates, URL
checks (dev mode off for the loopback variants), EHR sign-in in a browser, approval rules."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from connector_core.adapters.fhir_probe import FhirProbe
from connector_core.domain.models import utcnow
from devtools.sandbox.ehr import SandboxEhr, find_signin_link
from tests.integration.portal.conftest import (
    ADMIN,
    APPROVER,
    FAB_ADMIN,
    PortalClient,
)
from tests.stack import Stack


def _created(portal: PortalClient, ehr: SandboxEhr, **kw: Any) -> tuple[str, str]:
    response = portal.create(ehr.fhir_base, **kw)
    assert response.status_code == 201, response.text
    return response.json()["id"], response.headers["etag"]


def _ehr_signin(stack: Stack, portal: PortalClient, config_id: str, upn: str = APPROVER) -> Any:
    """The approver's browser: authorizeUrl -> EHR sign-in page -> pick the analyst -> callback."""
    started = portal.request("POST", f"/configs/{config_id}/ehr-signin", upn=upn)
    assert started.status_code == 200, started.text
    browser = stack.browser()
    try:
        page = browser.get(started.json()["authorizeUrl"])
        assert page.status_code == 200 and "Sign in to the Sandbox EHR" in page.text
        return browser.get(find_signin_link(page.text))
    finally:
        browser.close()


# --- the whole workflow -------------------------------------------------------------------------


def test_register_sign_in_approve_read_records_change_delete(
    stack: Stack, portal: PortalClient, ehr: SandboxEhr
) -> None:
    created = portal.create(ehr.fhir_base + "/")
    assert created.status_code == 201, created.text
    config = created.json()
    config_id = config["id"]
    assert config["fhirBaseUrl"] == ehr.fhir_base
    assert config["status"] == "pending_approval"
    assert config["tenantId"] == stack.tenant(0).tid and config["region"] == "americas"
    assert created.headers["location"] == f"{stack.api}/configs/{config_id}"

    got = portal.request("GET", f"/configs/{config_id}")
    assert got.status_code == 200 and got.headers["etag"] == created.headers["etag"]
    assert config_id in [c["id"] for c in portal.request("GET", "/configs").json()]
    assert portal.request("GET", f"/configs/{config_id}", upn=APPROVER).status_code == 200

    done = _ehr_signin(stack, portal, config_id)
    assert done.status_code == 200, done.text
    # back on the portal's page (CONNECTOR_PORTAL_URL), which says so
    assert str(done.url) == f"{stack.portal}?configId={config_id}&ehrSignin=ok"
    assert "EHR sign-in complete" in done.text
    signed = portal.request("GET", f"/configs/{config_id}").json()
    assert signed["ehrValidatedBy"] == APPROVER and signed["ehrValidatedAt"]

    approved = portal.request("POST", f"/configs/{config_id}/approve", upn=APPROVER)
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["status"] == "approved" and body["approvedBy"] == APPROVER
    records = {r["type"]: r for r in body["integrationRecords"]}
    assert records["provider"]["launchUrl"] == f"{stack.api}/launch/provider/{config_id}"
    assert records["patient"]["launchUrl"] == f"{stack.api}/launch/patient/{config_id}"
    assert records["provider"]["redirectUri"] == f"{stack.api}/launch/callback"
    assert records["provider"]["clientId"] == stack.sandbox.smart_client_id
    assert records["provider"]["jwksUrl"] == f"{stack.api}/.well-known/jwks.json"
    assert "launch" in records["provider"]["scopes"] and "openid" in records["patient"]["scopes"]
    assert body["backendServices"]["jwksUrl"] == f"{stack.api}/.well-known/jwks.json"
    # the admin sees the same records on GET
    assert (
        portal.request("GET", f"/configs/{config_id}").json()["integrationRecords"]
        == (body["integrationRecords"])
    )

    history = portal.request("GET", f"/configs/{config_id}/history")
    assert [h["action"] for h in history.json()] == ["created", "ehr_signin", "approved"]
    assert [h["by"] for h in history.json()] == [ADMIN, APPROVER, APPROVER]

    changed = portal.request(
        "PUT",
        f"/configs/{config_id}",
        json={"fhirBaseUrl": ehr.fhir_base, "approverUpn": APPROVER, "environment": "production"},
        headers={"If-Match": approved.headers["etag"]},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["status"] == "pending_approval"
    assert "integrationRecords" not in changed.json()
    # approval went stale: the old EHR sign-in no longer counts
    stale = portal.request("POST", f"/configs/{config_id}/approve", upn=APPROVER)
    assert stale.status_code == 409
    assert "Sign in to the EHR first" in stale.json()["detail"]

    deleted = portal.request(
        "DELETE", f"/configs/{config_id}", headers={"If-Match": changed.headers["etag"]}
    )
    assert deleted.status_code == 204
    assert portal.request("GET", f"/configs/{config_id}").status_code == 404


def test_approval_before_ehr_signin_is_409(portal: PortalClient, ehr: SandboxEhr) -> None:
    config_id, _ = _created(portal, ehr)
    response = portal.request("POST", f"/configs/{config_id}/approve", upn=APPROVER)
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")


def test_ehr_signin_older_than_30_minutes_does_not_allow_approval(
    stack: Stack, portal: PortalClient, ehr: SandboxEhr, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_id, _ = _created(portal, ehr)
    assert _ehr_signin(stack, portal, config_id).status_code == 200
    later = utcnow() + timedelta(minutes=31)
    monkeypatch.setattr(stack.container(), "clock", lambda: later)
    assert portal.request("POST", f"/configs/{config_id}/approve", upn=APPROVER).status_code == 409


def test_ehr_signin_callback_replay_and_forgery_are_html_errors(
    stack: Stack, portal: PortalClient, ehr: SandboxEhr
) -> None:
    config_id, _ = _created(portal, ehr)
    started = portal.request("POST", f"/configs/{config_id}/ehr-signin", upn=APPROVER)
    browser = stack.browser(follow_redirects=False)
    try:
        page = browser.get(started.json()["authorizeUrl"])
        to_callback = browser.get(find_signin_link(page.text))
        assert to_callback.status_code == 302
        callback = to_callback.headers["location"]
        assert callback.startswith(f"{stack.api}/ehr-signin/callback?")
        completed = browser.get(callback)
        assert completed.status_code == 302
        assert completed.headers["location"].startswith(f"{stack.portal}?configId={config_id}")
        replay = browser.get(callback)
        assert replay.status_code == 409 and "text/html" in replay.headers["content-type"]
        forged = browser.get(f"{stack.api}/ehr-signin/callback?code=x&state=forged")
        assert forged.status_code == 401 and "correlation id" in forged.text
    finally:
        browser.close()


def test_ehr_denial_is_reported(stack: Stack, portal: PortalClient, ehr: SandboxEhr) -> None:
    config_id, _ = _created(portal, ehr)
    started = portal.request("POST", f"/configs/{config_id}/ehr-signin", upn=APPROVER)
    browser = stack.browser()
    try:
        page = browser.get(started.json()["authorizeUrl"])
        denied = browser.get(find_signin_link(page.text, deny=True))
    finally:
        browser.close()
    assert denied.status_code == 403 and "access_denied" in denied.text
    assert portal.request("GET", f"/configs/{config_id}").json()["ehrValidatedAt"] is None


# --- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "alg_none",
        "unknown_kid",
        "hs256_public_key",
        "wrong_issuer",
        "issuer_other_tenant",
        "tampered",
    ],
)
def test_forged_or_stale_tokens_are_401(portal: PortalClient, kind: str) -> None:
    token = portal.entra.mint_forged_token(kind, roles=["Connector.Admin"])
    response = portal.request("GET", "/configs", token=token)
    assert response.status_code == 401, (kind, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("header", [None, "Bearer", "Basic YTpi", "Bearer x.y.z"])
def test_missing_or_malformed_authorization_is_401(
    portal: PortalClient, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    assert portal.http.get("/configs", headers=headers).status_code == 401


def test_403_without_the_admin_role_and_for_non_approvers(
    portal: PortalClient, ehr: SandboxEhr
) -> None:
    assert portal.create(ehr.fhir_base, upn=APPROVER).status_code == 403
    config_id, _ = _created(portal, ehr)
    nobody = portal.entra.mint_access_token(
        tid=portal.stack.tenant(0).tid, preferred_username="nurse@contosohealth.onmicrosoft.com"
    )
    assert portal.request("GET", f"/configs/{config_id}", token=nobody).status_code == 403
    for path in (f"/configs/{config_id}/ehr-signin", f"/configs/{config_id}/approve"):
        assert portal.request("POST", path, token=nobody).status_code == 403
        assert portal.request("POST", path, upn=ADMIN).status_code == 403  # admin != approver


def test_tenant_isolation(portal: PortalClient, ehr: SandboxEhr) -> None:
    config_id, etag = _created(portal, ehr)
    body = {"fhirBaseUrl": ehr.fhir_base, "approverUpn": APPROVER, "environment": "test"}
    assert portal.request("GET", f"/configs/{config_id}", upn=FAB_ADMIN).status_code == 404
    assert portal.request("GET", f"/configs/{config_id}/history", upn=FAB_ADMIN).status_code == 404
    put = portal.request(
        "PUT", f"/configs/{config_id}", upn=FAB_ADMIN, json=body, headers={"If-Match": etag}
    )
    assert put.status_code == 404
    assert portal.request("DELETE", f"/configs/{config_id}", upn=FAB_ADMIN).status_code == 404
    listed = portal.request("GET", "/configs", upn=FAB_ADMIN).json()
    assert config_id not in [c["id"] for c in listed]
    assert portal.request("GET", f"/configs/{config_id}").status_code == 200  # still there


# --- concurrency and duplicates ----------------------------------------------------------------


def test_put_needs_if_match_and_a_current_etag(portal: PortalClient, ehr: SandboxEhr) -> None:
    config_id, etag = _created(portal, ehr)
    body = {
        "fhirBaseUrl": ehr.fhir_base,
        "approverUpn": "x@contosohealth.onmicrosoft.com",
        "environment": "test",
    }
    missing = portal.request("PUT", f"/configs/{config_id}", json=body)
    assert missing.status_code == 428
    ok = portal.request("PUT", f"/configs/{config_id}", json=body, headers={"If-Match": etag})
    assert ok.status_code == 200 and ok.headers["etag"] != etag
    stale = portal.request("PUT", f"/configs/{config_id}", json=body, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["currentEtag"] == ok.headers["etag"]


def test_same_url_twice_is_409_with_the_existing_id(portal: PortalClient, ehr: SandboxEhr) -> None:
    config_id, _ = _created(portal, ehr)
    again = portal.create("HTTP" + ehr.fhir_base[4:] + "/")  # same URL, other spelling
    assert again.status_code == 409
    assert again.json()["existingId"] == config_id
    production = portal.create(ehr.fhir_base, environment="production")
    assert production.status_code == 201  # one per environment


# --- URL validation ---------------------------------------------------------------------------


def _problem(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["field"] == "fhirBaseUrl"
    return problem


def test_dstu2_server_gets_the_r4_hint(portal: PortalClient, ehr: SandboxEhr) -> None:
    problem = _problem(portal.create(ehr.dstu2_base))
    assert problem["code"] == "fhir-version-dstu2"
    assert "DSTU2" in problem["detail"] and "R4" in problem["detail"]
    assert problem["suggestedUrl"] == ehr.fhir_base


def test_server_without_s256(portal: PortalClient, ehr: SandboxEhr) -> None:
    problem = _problem(portal.create(ehr.no_pkce_base))
    assert problem["code"] == "pkce-s256-unsupported"
    assert "S256" in problem["detail"]


def test_no_smart_discovery(portal: PortalClient, ehr: SandboxEhr) -> None:
    problem = _problem(portal.create(f"{ehr.base_url}/fhir/nothing-here"))
    assert problem["code"] == "smart-discovery-unreachable"
    assert "404" in problem["detail"]


def test_ehr_down_during_discovery(portal: PortalClient, ehr: SandboxEhr) -> None:
    ehr.fail_next("discovery", status=503)
    problem = _problem(portal.create(ehr.fhir_base))
    assert problem["code"] == "smart-discovery-unreachable"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("fhir.example.org/r4", "url-scheme"),
        ("ftp://fhir.example.org/r4", "url-scheme"),
        ("https://fhir.example.org/r4?x=1", "url-syntax"),
        ("https://user:pw@fhir.example.org/r4", "url-syntax"),
    ],
)
def test_syntax_and_scheme(portal: PortalClient, url: str, code: str) -> None:
    assert _problem(portal.create(url))["code"] == code


@pytest.fixture
def dev_mode_off(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployment's URL checks as outside dev mode (the stack itself runs in dev mode)."""
    monkeypatch.setattr(stack.container(), "fhir_probe", FhirProbe(dev_mode=False))


@pytest.mark.usefixtures("dev_mode_off")
def test_http_is_refused_outside_dev_mode(portal: PortalClient, ehr: SandboxEhr) -> None:
    problem = _problem(portal.create(ehr.fhir_base))
    assert problem["code"] == "url-scheme" and "https" in problem["detail"]


@pytest.mark.usefixtures("dev_mode_off")
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1.2.3",
        "[::1]",
        "localhost",
        "2130706433",
        "0x7f.1",
        "127.1",
        "017700000001",
        "[::ffff:127.0.0.1]",
    ],
)
def test_loopback_targets_are_refused_outside_dev_mode(portal: PortalClient, host: str) -> None:
    problem = _problem(portal.create(f"https://{host}/fhir/r4"))
    assert problem["code"] == "url-target"
    assert "loopback" in problem["detail"]


# --- the document ---------------------------------------------------------------------------


def test_openapi_document_is_served(stack: Stack) -> None:
    with stack.http() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": stack.api}]
    assert {"/configs", "/configs/{id}", "/configs/{id}/approve"} <= set(doc["paths"])
