"""The configuration portal's pages over real HTTP through the local host, with the sandbox
Entra (account picker), Graph (directory search) and EHR: the personas' flows, the refusals
(no role, forged forms, expired sessions, invalid URLs), sessions and cookies, and the links to
the same use cases as the JSON API."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest

from connector_core.domain.models import utcnow
from connector_core.service.portal_web.records import EPIC_GROUP_VISIT_QUERY, EPIC_VISIT_QUERY
from devtools.sandbox.ehr import SandboxEhr, find_signin_link
from tests.portal.helpers import PortalUser, form_fields, persona_upn
from tests.stack import Stack

Person = Callable[..., PortalUser]
CONFIG_URL = re.compile(r"/api/portal/configs/([0-9a-f]{32})")


def _create(
    user: PortalUser,
    fhir_base: str,
    approver: str,
    *,
    environment: str = "test",
    vendor: str = "epic",
) -> httpx.Response:
    form = user.get("/configs/new")
    assert form.status_code == 200, form.text[:500]
    return user.post_form(
        form,
        "/configs",
        fhirBaseUrl=fhir_base,
        approverUpn=approver,
        environment=environment,
        ehrVendor=vendor,
    )


def _config_id(response: httpx.Response) -> str:
    match = CONFIG_URL.search(str(response.url))
    assert match, response.url
    return match.group(1)


def _ehr_signin(
    user: PortalUser, page: httpx.Response, analyst: str | None = None
) -> httpx.Response:
    """The approver clicks "Sign in to the EHR", picks the analyst at the EHR, comes back."""
    to_ehr = user.client.post(
        str(page.url).split("?")[0] + "/ehr-signin",
        data=form_fields(page.text, "/ehr-signin")[1],
        headers={"Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert to_ehr.status_code == 303, to_ehr.text[:800]
    signin_page = user.client.get(to_ehr.headers["location"])
    assert "Sign in to the Sandbox EHR" in signin_page.text
    return user.client.get(find_signin_link(signin_page.text, analyst))


def _records(page: str) -> dict[tuple[str, str], str]:
    """Integration records on a page: (group, field) -> the value shown (and copied)."""
    found: dict[tuple[str, str], str] = {}
    for group, body in re.findall(
        r'<section class="record-group" data-group="([^"]+)"(.*?)</section>', page, re.S
    ):
        for key, value in re.findall(
            r'<div class="record-field" data-key="([^"]+)">.*?<code class="record-value"[^>]*>([^<]*)</code>',
            body,
            re.S,
        ):
            found[(group, key)] = html.unescape(value)
    return found


# --- the whole flow ---------------------------------------------------------------------------


def test_admin_creates_test_and_production_configs_approver_signs_in_to_the_ehr_and_approves(
    stack: Stack, ehr: SandboxEhr, person: Person
) -> None:
    approver = persona_upn(stack, "approver")
    admin = person()
    home = admin.sign_in("admin")
    assert "Configurations" in home.text and 'id="new-config"' in home.text
    epic = ehr.profile("epic")
    created = {}
    for environment in ("test", "production"):
        page = _create(admin, epic.fhir_base, approver, environment=environment)
        assert page.status_code == 200, page.text[:2000]
        assert "Configuration created" in page.text
        created[environment] = _config_id(page)
        assert 'id="waiting-for-approver"' in page.text  # the admin is not the approver
    listing = admin.get()
    for environment, config_id in created.items():
        assert f'data-config-id="{config_id}" data-environment="{environment}"' in listing.text

    analyst = person()
    mine = analyst.sign_in("approver")
    assert all(config_id in mine.text for config_id in created.values())
    assert 'id="new-config"' not in mine.text  # no admin role
    page = analyst.get(f"/configs/{created['test']}")
    assert 'id="ehr-signin"' in page.text and 'id="approve"' not in page.text
    # the page lets its form go to this EHR's authorization server, and nowhere else
    csp = page.headers["content-security-policy"]
    assert (
        "form-action 'self' 127.0.0.1:* localhost:*" in csp
        or "form-action 'self' 127.0.0.1:*" in csp
    )

    back = _ehr_signin(analyst, page)
    assert back.status_code == 200, back.text[:800]
    assert str(back.url).endswith(f"/api/portal/configs/{created['test']}?ehrSignin=1")
    assert "Your EHR sign-in was recorded" in back.text
    approved = analyst.post_form(back, "/approve")
    assert approved.status_code == 200, approved.text[:800]
    assert "Approved. Enter the integration records" in approved.text
    records = _records(approved.text)
    provider = f"{stack.api}/launch/provider/{created['test']}"
    patient = f"{stack.api}/launch/patient/{created['test']}"
    assert records[("epic-provider", "launch-url")] == f"{provider}?{EPIC_VISIT_QUERY}"
    assert records[("epic-patient", "launch-url")] == f"{patient}?{EPIC_VISIT_QUERY}"
    assert records[("epic-group", "provider-launch-url")] == f"{provider}?{EPIC_GROUP_VISIT_QUERY}"
    assert records[("epic-group", "patient-launch-url")] == f"{patient}?{EPIC_GROUP_VISIT_QUERY}"
    assert "departmentId=%PERFDEPID%" in records[("epic-provider", "launch-url")]
    assert records[("epic-client", "redirect-uri")] == f"{stack.api}/launch/callback"
    assert records[("epic-client", "signin-uri")] == f"{stack.api}/ehr-signin/callback"
    assert records[("epic-client", "jwks-url")] == f"{stack.api}/.well-known/jwks.json"
    assert records[("epic-client", "client-id")] == stack.sandbox.smart_client_id

    # the same use cases as the JSON API: the API sees what the pages did
    token = stack.sandbox.entra.mint_user_token(persona_upn(stack, "admin"))
    api = httpx.get(
        f"{stack.api}/configs/{created['test']}", headers={"Authorization": f"Bearer {token}"}
    )
    body = api.json()
    assert body["status"] == "approved" and body["approvedBy"] == approver
    assert body["ehrValidatedBy"] == approver
    device_test = f"{stack.api}/device-test/{created['test']}"
    assert {r["launchUrl"] for r in body["integrationRecords"]} == {provider, patient, device_test}
    history = admin.get(f"/configs/{created['test']}/history")
    assert [a for a in ("Approved", "Signed in to the EHR", "Created") if a in history.text] == [
        "Approved",
        "Signed in to the EHR",
        "Created",
    ]
    # the production config still waits for its own approval
    assert 'data-status="pending_approval"' in analyst.get().text


def test_an_admin_who_is_also_the_approver_does_everything_in_one_session(
    stack: Stack, ehr: SandboxEhr, person: Person
) -> None:
    lead = person()
    lead.sign_in("admin-approver")
    me = persona_upn(stack, "admin-approver")
    page = _create(lead, ehr.profile("oracle").fhir_base, me, vendor="oracle")
    assert page.status_code == 200, page.text[:1500]
    assert 'id="ehr-signin"' in page.text and 'id="edit-link"' in page.text
    back = _ehr_signin(lead, page)
    approved = lead.post_form(back, "/approve")
    assert "Approved. Enter the integration records" in approved.text
    records = _records(approved.text)
    config_id = _config_id(approved)
    assert records[("oracle-provider", "launch-url")] == f"{stack.api}/launch/provider/{config_id}"
    assert records[("oracle-patient", "launch-url")] == f"{stack.api}/launch/patient/{config_id}"
    assert "%" not in "".join(records.values())  # Oracle Health has no context tokens


# --- who may do what ----------------------------------------------------------------------------


def test_a_user_without_a_role_sees_nothing_and_cannot_create(
    stack: Stack, ehr: SandboxEhr, person: Person
) -> None:
    admin = person()
    admin.sign_in("admin")
    form = admin.get("/configs/new")  # a real form of a real admin session, to copy from
    nobody = person()
    home = nobody.sign_in("no-role")
    assert 'id="no-role"' in home.text and 'id="new-config"' not in home.text
    refused = nobody.get("/configs/new")
    assert refused.status_code == 403 and "Connector.Admin" in refused.text
    assert "Reference (correlation id)" in refused.text
    # with its own valid session and CSRF token, the use case still refuses
    own = nobody.get()
    _, fields = form_fields(own.text, "/signout")
    posted = nobody.client.post(
        nobody.url("/configs"),
        data={
            **form_fields(form.text, "/configs")[1],
            "csrf": fields["csrf"],
            "fhirBaseUrl": ehr.fhir_base,
            "approverUpn": persona_upn(stack, "approver"),
        },
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert posted.status_code == 403 and "Connector.Admin" in posted.text
    directory = nobody.client.post(
        nobody.url("/directory"),
        data={"q": "perp", "csrf": fields["csrf"]},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert directory.status_code == 403 and "results" not in directory.json()
    assert (
        stack.container().configs.find_id_by_url(stack.tenant(0).tid, "test", ehr.fhir_base) is None
    )


def test_forged_forms_change_nothing(stack: Stack, ehr: SandboxEhr, person: Person) -> None:
    admin = person()
    admin.sign_in("admin")
    form = admin.get("/configs/new")
    _, fields = form_fields(form.text, "/configs")
    fields.update(fhirBaseUrl=ehr.fhir_base, approverUpn=persona_upn(stack, "approver"))
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({k: v for k, v in fields.items() if k != "csrf"}, {"Sec-Fetch-Site": "same-origin"}),
        ({**fields, "csrf": "0" * 64}, {"Sec-Fetch-Site": "same-origin"}),
        (fields, {"Sec-Fetch-Site": "cross-site"}),  # another site's page posting the form
        (fields, {"Origin": "https://evil.example"}),
    ]
    for data, headers in attempts:
        refused = admin.client.post(admin.url("/configs"), data=data, headers=headers)
        assert refused.status_code == 403, (headers, refused.status_code)
        assert "nothing was changed" in refused.text
    # another user's token does not fit this session
    other = person()
    other.sign_in("admin-approver")
    _, theirs = form_fields(other.get().text, "/signout")
    stolen = admin.client.post(
        admin.url("/configs"),
        data={**fields, "csrf": theirs["csrf"]},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert stolen.status_code == 403
    signout = admin.client.post(
        admin.url("/signout"), data={}, headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert signout.status_code == 403  # signing someone out is a state change too
    assert (
        stack.container().configs.find_id_by_url(stack.tenant(0).tid, "test", ehr.fhir_base) is None
    )
    # the genuine form works
    ok = admin.client.post(
        admin.url("/configs"), data=fields, headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert ok.status_code == 200 and "Configuration created" in ok.text


def test_a_session_expires_when_idle_and_after_eight_hours_and_dies_at_sign_out(
    stack: Stack, ehr: SandboxEhr, person: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = stack.container()
    admin = person()
    admin.sign_in("admin")
    cookie = next(c for c in admin.browser.jar if c.name == "__Host-vv-portal")
    copied = cookie.value
    start = utcnow()

    def at(minutes: float) -> None:
        monkeypatch.setattr(container, "clock", lambda: start + timedelta(minutes=minutes))

    # working steadily: every page within 30 minutes of the last keeps the session alive
    for minute in (20, 45, 70):
        at(minute)
        assert 'id="new-config"' in admin.get().text, minute
    # idle for more than 30 minutes: signed out, told why, the cookie cleared
    at(70 + 31)
    expired = admin.get()
    assert "Your session expired" in expired.text and 'id="signin-button"' in expired.text
    assert "__Host-vv-portal=;" in expired.headers.get("set-cookie", "")
    # a POST of an expired session changes nothing
    at(0)
    admin2 = person()
    admin2.sign_in("admin")
    form = admin2.get("/configs/new")
    at(31)
    posted = admin2.post_form(
        form, "/configs", fhirBaseUrl=ehr.fhir_base, approverUpn=persona_upn(stack, "approver")
    )
    assert posted.status_code == 401 and "Your session expired" in posted.text
    # absolute limit: 8 hours after sign-in even while active
    at(0)
    busy = person()
    busy.sign_in("admin")
    minute = 0
    while minute < 8 * 60 - 20:
        minute += 20
        at(minute)
        assert busy.get().status_code == 200
    at(8 * 60 + 1)
    assert "Your session expired" in busy.get().text
    # sign-out: the old cookie, replayed, is dead (the server-side record is gone)
    at(0)
    leaving = person()
    leaving.sign_in("admin")
    kept = next(c for c in leaving.browser.jar if c.name == "__Host-vv-portal").value
    signed_out = leaving.post_form(leaving.get(), "/signout")
    assert "You signed out" in signed_out.text
    replay = httpx.get(stack.portal, cookies={"__Host-vv-portal": kept})
    assert 'id="signin-button"' in replay.text and "Your session expired" in replay.text
    # the cookie is sealed: no readable session id or identity in it
    assert len(copied) > 60
    for part in copied.split("."):  # as text, and each part as base64url
        readable = part.encode() + base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        assert b'"sid"' not in readable and b"contoso" not in readable.lower()


def test_cookies_are_host_only_secure_httponly_lax_and_pages_carry_a_strict_csp(
    stack: Stack, person: Person
) -> None:
    admin = person()
    start = admin.client.get(admin.url("/signin"), follow_redirects=False)
    assert start.status_code == 302
    assert urlsplit(start.headers["location"]).netloc == urlsplit(stack.sandbox.entra_url).netloc
    assert "code_challenge_method=S256" in start.headers["location"]
    signin_cookie = start.headers["set-cookie"]
    assert signin_cookie.startswith("__Host-vv-portal-signin=")
    admin.sign_in("admin")
    page = admin.get()
    landing_cookies = [c for c in admin.browser.jar if c.name == "__Host-vv-portal"]
    assert len(landing_cookies) == 1
    cookie = landing_cookies[0]
    assert cookie.secure and cookie.path == "/" and not cookie.domain_specified
    assert (
        cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "Lax"
    )
    csp = {
        d.strip().split(" ")[0]: d.strip()
        for d in page.headers["content-security-policy"].split(";")
    }
    assert csp["default-src"] == "default-src 'none'"
    assert csp["script-src"] == "script-src 'self'" and csp["style-src"] == "style-src 'self'"
    assert (
        csp["frame-ancestors"] == "frame-ancestors 'none'"
        and csp["form-action"] == "form-action 'self'"
    )
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
    # no token ever reaches the browser: the page, its cookies, nothing carries a JWT
    everything = page.text + "".join(f"{c.name}={c.value}" for c in admin.browser.jar)
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ", everything)
    css = re.search(r'href="(/api/portal/static/portal\.css\?v=[0-9a-f]+)"', page.text)
    assert css
    static = admin.client.get(stack.url + css.group(1))
    assert static.status_code == 200 and "immutable" in static.headers["cache-control"]
    assert static.headers["content-type"].startswith("text/css")
    for bad in ("../function_app.py", "%2e%2e%2fhost.json", "portal.py", ".hidden.css"):
        assert admin.client.get(f"{stack.portal}/static/{bad}").status_code == 404


def test_the_signin_answer_works_once_and_only_in_the_browser_that_started_it(
    stack: Stack, person: Person
) -> None:
    admin = person()
    picker = admin.client.get(admin.url("/signin"))
    link = html.unescape(
        re.search(r'data-persona="admin"[^>]*href="([^"]+)"', picker.text).group(1)
    )
    to_callback = admin.client.get(link, follow_redirects=False)
    callback = to_callback.headers["location"]
    assert callback.startswith(f"{stack.portal}/signin-callback?")
    started = next(c.value for c in admin.browser.jar if c.name == "__Host-vv-portal-signin")
    # another browser cannot use this answer (no sign-in cookie of its own)
    thief = person()
    stolen = thief.client.get(callback)
    assert stolen.status_code == 401 and "did not start in this browser" in stolen.text
    assert admin.client.get(callback).status_code == 200
    assert 'id="new-config"' in admin.get().text
    # the same answer with the same sign-in cookie, replayed: refused (single use)
    replayed = httpx.get(callback, cookies={"__Host-vv-portal-signin": started})
    assert replayed.status_code == 409 and "works only once" in replayed.text
    # a reload of the answer after signing in (the cookie is gone by then) says so too, and
    # what to do: not "another browser"
    reloaded = admin.client.get(callback)
    assert reloaded.status_code == 409 and "already completed" in reloaded.text
    assert "did not start in this browser" not in reloaded.text
    assert "you are signed in" in reloaded.text
    denied = thief.client.get(f"{stack.portal}/signin-callback?error=access_denied&state=x")
    assert denied.status_code == 401


def test_a_late_signin_answer_says_it_expired(stack: Stack, person: Person) -> None:
    container = stack.container()
    expired = container.keyring.seal("portal-signin", {"flow": {"state": "s"}}, ttl_seconds=-1)
    late = httpx.get(
        f"{stack.portal}/signin-callback?code=c&state=s",
        cookies={"__Host-vv-portal-signin": expired},
    )
    assert late.status_code == 401 and "has expired" in late.text
    assert "did not start in this browser" not in late.text
    # the cookie outlives the sealed flow (10 minutes), so a late answer still carries it
    start = person().client.get(f"{stack.portal}/signin", follow_redirects=False)
    assert "Max-Age=1200" in start.headers["set-cookie"]


def test_a_tenant_outside_connector_allowed_tenants_is_told_so(
    stack: Stack, person: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = stack.container()
    only_fabrikam = container.settings.model_copy(
        update={"allowed_tenants": frozenset({stack.tenant(1).tid})}
    )
    monkeypatch.setattr(container, "settings", only_fabrikam)
    admin = person()
    picker = admin.client.get(admin.url("/signin"))
    link = html.unescape(
        re.search(r'data-persona="admin"[^>]*href="([^"]+)"', picker.text).group(1)
    )
    refused = admin.client.get(link)
    assert refused.status_code == 403 and "CONNECTOR_ALLOWED_TENANTS" in refused.text
    assert not [c for c in admin.browser.jar if c.name == "__Host-vv-portal" and c.value]


# --- the form -----------------------------------------------------------------------------------


def test_invalid_urls_come_back_inline_with_the_apis_messages_and_dstu2_offers_r4(
    stack: Stack, ehr: SandboxEhr, person: Person
) -> None:
    admin = person()
    admin.sign_in("admin")
    approver = persona_upn(stack, "approver")
    bad = _create(admin, "not a url", approver)
    assert bad.status_code == 400
    assert 'id="error-summary"' in bad.text and 'aria-invalid="true"' in bad.text
    assert "This is not a valid URL." in bad.text
    assert 'value="not a url"' in bad.text  # what the admin typed is kept
    api = httpx.post(
        f"{stack.api}/configs",
        json={"fhirBaseUrl": "not a url", "approverUpn": approver, "environment": "test"},
        headers={
            "Authorization": f"Bearer {stack.sandbox.entra.mint_user_token(persona_upn(stack, 'admin'))}"
        },
    )
    assert html.escape(api.json()["detail"], quote=False) in bad.text  # the API's own message

    wrong_upn = _create(admin, ehr.fhir_base, "not-an-upn")
    assert wrong_upn.status_code == 400 and "user principal name" in wrong_upn.text

    dstu2 = _create(admin, ehr.dstu2_base, approver)
    assert dstu2.status_code == 400 and 'id="use-suggested"' in dstu2.text
    suggested = html.unescape(
        re.search(r'name="useSuggested" value="([^"]+)"', dstu2.text).group(1)
    )
    assert suggested == ehr.fhir_base
    fixed = admin.post_form(dstu2, "/configs", useSuggested=suggested)  # the one click
    assert fixed.status_code == 200 and "Configuration created" in fixed.text
    assert f">{ehr.fhir_base}<" in fixed.text

    again = _create(admin, ehr.fhir_base, approver)
    assert again.status_code == 400 and 'id="existing-config"' in again.text
    assert f"/api/portal/configs/{_config_id(fixed)}" in again.text


def test_change_with_a_stale_form_and_delete_after_confirmation(
    stack: Stack, ehr: SandboxEhr, person: Person
) -> None:
    admin = person()
    admin.sign_in("admin")
    page = _create(admin, ehr.fhir_base, persona_upn(stack, "approver"), vendor="smart")
    config_id = _config_id(page)
    edit = admin.get(f"/configs/{config_id}/edit")
    first = admin.post_form(edit, f"/configs/{config_id}", environment="production")
    assert "Configuration saved" in first.text and "Production" in first.text
    stale = admin.post_form(edit, f"/configs/{config_id}", environment="test")  # old ETag
    assert str(stale.url).endswith(f"/configs/{config_id}/edit?stale=1")
    assert "Someone changed this configuration" in stale.text
    confirm = admin.get(f"/configs/{config_id}/delete")
    assert "Delete the configuration?" in confirm.text
    assert stack.container().configs.get(stack.tenant(0).tid, config_id)  # not deleted by a GET
    deleted = admin.post_form(confirm, "/delete")
    assert "Configuration deleted" in deleted.text
    assert admin.get(f"/configs/{config_id}").status_code == 404


def test_the_directory_search_asks_graph_as_graph_wants_it(stack: Stack, person: Person) -> None:
    admin = person()
    admin.sign_in("admin")
    _, fields = form_fields(admin.get("/configs/new").text, "/configs")

    def search(q: str) -> httpx.Response:
        return admin.client.post(
            admin.url("/directory"),
            data={"q": q, "csrf": fields["csrf"]},
            headers={"Sec-Fetch-Site": "same-origin"},
        )

    found = search("thorn").json()["results"]
    assert [p["upn"] for p in found] == [persona_upn(stack, "approver")]
    assert found[0]["name"] == stack.sandbox.entra.persona("approver").display_name
    assert {p["upn"] for p in search("ehr.an").json()["results"]} == {
        persona_upn(stack, "approver")
    }
    assert search("x").json()["results"] == []  # too short: Graph is not asked
    assert search('"displayName:a" OR "x').status_code == 200  # quotes never reach Graph
    fabrikam = stack.sandbox.entra.persona("approver").tid != stack.tenant(1).tid
    assert fabrikam and not [p for p in search("Brackenridge").json()["results"]]  # own tenant only
    calls = [r for r in stack.sandbox.graph.requests if r[1] == "/v1.0/users"]
    assert calls and all(status == 200 for _, _, status in calls)
    # a GET (a query string in logs) is not offered
    assert admin.client.get(admin.url("/directory") + "?q=thorn").status_code in (404, 405)


def test_languages_from_accept_language_the_switch_and_the_cookie(
    stack: Stack, person: Person
) -> None:
    portuguese = person(language="pt-BR,pt;q=0.9,en;q=0.5")
    page = portuguese.get()
    assert '<html lang="pt-BR"' in page.text and "Entrar com a Microsoft" in page.text
    spanish = person(language="es-MX")
    assert "Iniciar sesión con Microsoft" in spanish.get().text
    english = person(language="de-DE, fr;q=0.8")
    assert '<html lang="en"' in english.get().text
    switched = english.get("?lang=es")
    assert '<html lang="es"' in switched.text
    assert "__Host-vv-lang=es" in switched.headers["set-cookie"]
    assert '<html lang="es"' in english.get().text  # remembered
    home = english.sign_in("admin")
    assert "Nueva configuración" in home.text
    assert english.get("?lang=xx").status_code == 200  # an unknown language changes nothing
