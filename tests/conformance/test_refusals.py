"""What the connector must refuse when the authorization server is a certified one (and what
the certified server itself refuses): mix-up (RFC 9207 ``iss``), replays, unregistered
redirect URIs, an id_token without the nonce, unknown launches. Every refusal is a short HTML
page with a correlation id, never a 500."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import pytest

from connector_core.domain.models import Environment, TenantConfig
from devtools.conformance import ConformanceServer
from devtools.sandbox import seed
from tests.conformance.conftest import (
    ADMIN,
    APPROVER,
    SOLO,
    approved_config,
    assert_error_page,
    practitioner_of,
    query_of,
    set_mapping,
    walk_to_callback,
)
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow


def _with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = query_of(url)
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


def _callback(s: Stack, cs: ConformanceServer, config: TenantConfig) -> tuple[Browser, str]:
    """A provider launch walked by hand up to oidc-provider's redirect into the connector's
    callback (not delivered). The clinician is mapped: a good delivery goes to the meeting."""
    set_mapping(s, cs, practitioner_of(SOLO))
    browser = s.browser(follow_redirects=False)
    callback = walk_to_callback(
        browser, cs.launch_url(config.id, appointment_id=SOLO, user="clinician")
    )
    answer = query_of(callback)
    assert answer["iss"] == cs.issuer and answer["code"] and answer["state"], callback
    return browser, callback


def _into_meeting(s: Stack, response: httpx.Response) -> bool:
    return response.status_code == 302 and response.headers["location"].startswith(
        s.sandbox.graph_url
    )


@pytest.mark.parametrize("wrong", ["fhir-base", "other-issuer"])
def test_authorization_response_from_another_issuer_is_refused(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig, wrong: str
) -> None:
    browser, callback = _callback(fresh_stack, cs, config)
    iss = cs.fhir_base if wrong == "fhir-base" else f"{cs.origin}/another-as"
    response = browser.get(_with_query(callback, iss=iss))
    assert_error_page(response, 400, 401, 403)
    assert "another server" in response.text or "another issuer" in response.text
    assert not [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]


def test_authorization_response_without_iss_is_refused(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    browser, callback = _callback(fresh_stack, cs, config)
    response = browser.get(_with_query(callback, iss=None))
    assert_error_page(response, 400, 401, 403)
    assert not [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]


def test_replayed_callback_is_refused(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    browser, callback = _callback(fresh_stack, cs, config)
    binding = "; ".join(
        f"{c.name}={c.value}" for c in browser.jar if c.name.startswith("__Host-vvl-")
    )
    assert binding
    first = browser.get(callback)
    assert _into_meeting(fresh_stack, first), (first.status_code, first.text[:800])
    again = browser.get(callback)
    assert_error_page(again, 401, 409)
    # Even with the browser-binding cookie put back, the state works once only.
    with httpx.Client(timeout=30.0) as raw:
        replay = raw.get(callback, headers={"cookie": binding})
    assert_error_page(replay, 401, 409)
    assert "already used" in replay.text
    exchanges = [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]
    assert len(exchanges) == 1  # refused before the code went back to the server


def test_replayed_code_is_refused_by_the_certified_server_and_shown_clearly(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    s = fresh_stack
    browser, first_callback = _callback(s, cs, config)
    assert _into_meeting(s, browser.get(first_callback))
    # A second launch in the same browser; its answer carries the first, already used, code.
    second_callback = walk_to_callback(
        browser,
        cs.launch_url(config.id, appointment_id=SOLO, user="clinician"),
    )
    replay = _with_query(second_callback, code=query_of(first_callback)["code"])
    response = browser.get(replay)
    assert_error_page(response, 401)  # invalid_grant: the answer's fault, not the EHR's
    assert not _into_meeting(s, response)
    exchanges = [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]
    assert [r["status"] for r in exchanges] == [200, 400], exchanges
    assert exchanges[-1]["error"] == "invalid_grant"


def test_id_token_without_nonce_is_refused(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    """oidc-provider always echoes a nonce it was sent; the server's hook strips ``nonce`` from
    the authorization request before oidc-provider reads it, so the (genuinely signed)
    id_token has none while the connector expects its own."""
    cs.omit_nonce()
    browser, callback = _callback(fresh_stack, cs, config)
    response = browser.get(callback)
    assert_error_page(response, 401)
    assert "nonce" in response.text
    assert not _into_meeting(fresh_stack, response)
    exchanges = [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]
    assert [r["status"] for r in exchanges] == [200]  # the server answered; the connector refused


@pytest.mark.parametrize("registration", ["redirect-not-registered", "unknown-client"])
def test_client_whose_redirect_uri_is_not_registered_gets_a_clear_page(
    fresh_stack: Stack, cs: ConformanceServer, registration: str
) -> None:
    """A config whose SMART client id is registered at the EHR with another redirect URI (or
    not at all): oidc-provider refuses to redirect anywhere and says why on its own page; the
    connector's callback is never reached and nothing answers 500."""
    s = fresh_stack
    client_id = (
        cs.other_redirect_client_id
        if registration == "redirect-not-registered"
        else "not-registered-here"
    )
    config = approved_config(s, cs, smart_client_id=client_id, environment=Environment.PRODUCTION)
    try:
        set_mapping(s, cs, practitioner_of(SOLO))
        response = s.browser().get(cs.launch_url(config.id, appointment_id=SOLO, user="clinician"))
    finally:
        s.container().configs.delete(config.tenant_id, config.id)
        s.container().launch_cache.forget_config(config.id)
    assert response.status_code == 400, (response.status_code, response.text[:800])
    assert str(response.url).startswith(f"{cs.issuer}/auth?")
    assert "text/html" in response.headers["content-type"]
    expected = (
        "invalid_redirect_uri" if registration == "redirect-not-registered" else "invalid_client"
    )
    assert f'data-error="{expected}"' in response.text, response.text[:800]
    assert all(r.status_code < 500 for r in response.history)
    assert not any("/api/launch/callback" in str(r.url) for r in response.history)


def test_launch_the_ehr_never_issued_is_refused_by_the_server_and_shown_clearly(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    url = cs.launch_url(config.id, appointment_id=SOLO, user="clinician")
    forged = _with_query(url, launch="not-a-launch-this-ehr-issued")
    response = fresh_stack.browser().get(forged)
    assert_error_page(response, 400)
    assert urlsplit(str(response.url)).path == "/api/launch/callback"
    assert query_of(str(response.url))["error"] == "invalid_request"


def test_ehr_access_denied_is_a_clear_page(
    fresh_stack: Stack, cs: ConformanceServer, config: TenantConfig
) -> None:
    url = cs.launch_url(config.id, appointment_id=SOLO, user="clinician", deny=True)
    response = fresh_stack.browser().get(url)
    assert_error_page(response, 403)
    assert "access denied" in response.text


@pytest.mark.parametrize("tamper", ["fhir-base", "missing"])
def test_ehr_signin_answer_with_a_wrong_or_missing_iss_is_refused(
    fresh_stack: Stack, cs: ConformanceServer, tamper: str
) -> None:
    """RFC 9207 applies to the approver's EHR sign-in as much as to launches."""
    s = fresh_stack
    container = s.container()
    tid = s.tenant(0).tid
    existing = container.configs.find_id_by_url(tid, "test", cs.fhir_base)
    if existing is not None:
        container.configs.delete(tid, existing)
    admin = s.sandbox.entra.mint_user_token(ADMIN)
    approver = s.sandbox.entra.mint_user_token(APPROVER)
    with httpx.Client(base_url=s.api, timeout=30.0) as api:
        created = api.post(
            "/configs",
            headers={"Authorization": f"Bearer {admin}"},
            json={"fhirBaseUrl": cs.fhir_base, "approverUpn": APPROVER, "environment": "test"},
        )
        assert created.status_code == 201, created.text
        config_id = created.json()["id"]
        try:
            started = api.post(
                f"/configs/{config_id}/ehr-signin", headers={"Authorization": f"Bearer {approver}"}
            )
            assert started.status_code == 200, started.text
            browser = s.browser(follow_redirects=False)
            page = browser.get(started.json()["authorizeUrl"])
            hops = 0
            while page.status_code in (302, 303) and hops < 6:
                page = browser.get(str(httpx.URL(str(page.url)).join(page.headers["location"])))
                hops += 1
            assert cs.is_login_page(page), (page.status_code, page.text[:500])
            answer = cs.submit_login(browser, page, f"Practitioner/{seed.ANALYST_ID}")
            callback = walk_to_callback(
                browser,
                str(httpx.URL(str(answer.url)).join(answer.headers["location"])),
                callback_path="/api/ehr-signin/callback",
            )
            assert query_of(callback)["iss"] == cs.issuer
            bad = _with_query(callback, iss=cs.fhir_base if tamper == "fhir-base" else None)
            response = browser.get(bad)
            assert_error_page(response, 400, 401, 403)
            assert not [r for r in cs.token_requests() if r["grantType"] == "authorization_code"]
            config = api.get(
                f"/configs/{config_id}", headers={"Authorization": f"Bearer {admin}"}
            ).json()
            assert not config.get("ehrValidatedAt")
        finally:
            container.configs.delete(tid, config_id)
