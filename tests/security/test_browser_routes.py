"""Every browser route against open redirects and header injection, through the local host.

A browser that does not follow redirects walks the real flows (clinician's first launch with
the Microsoft sign-in, patient, waiting page, the approver's EHR sign-in) and every request to
the connector carries attacker parameters (``redirect_uri``, ``next``, ``returnUrl``, ``//host``,
``javascript:``...). Every 3xx the connector answers must go to the EHR's discovered
authorization endpoint, the Entra authority, a meeting Graph returned, or the configured portal:
never anywhere the query string names. CR/LF in query values never reach a response header.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit, urlunsplit

import httpx
import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from devtools.sandbox.ehr import find_signin_link
from tests.e2e.launch.helpers import drop_config, forget_mapping, own_config
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow

SOLO = "appt-6b1e0d34"
EVIL_HOST = "evil.example"
EVIL = {
    "redirect_uri": f"https://{EVIL_HOST}/cb",
    "next": f"//{EVIL_HOST}/next",
    "returnUrl": f"https://{EVIL_HOST}/return",
    "return_to": f"/\\{EVIL_HOST}/x",
    "continue": "javascript:alert(document.domain)",
    "url": f"https:{EVIL_HOST}",
    "target": "http://127.0.0.1:1/internal",
}
REDIRECTS = (301, 302, 303, 307, 308)


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


def _with(url: str, extra: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urlencode(extra)
    return urlunsplit(parts._replace(query=query))


@dataclass
class Walk:
    """A walk through a flow: each connector response that redirected, with its target."""

    stack: Stack
    hops: list[tuple[str, str]] = field(default_factory=list)  # (connector path, Location)

    def is_connector(self, url: str) -> bool:
        return url.startswith(self.stack.api + "/")

    def run(self, browser: Browser, url: str, *, upn: str | None = None) -> httpx.Response:
        for _ in range(20):
            if self.is_connector(url):
                url = _with(url, EVIL)
            response = browser.get(url)
            if response.status_code in REDIRECTS:
                location = response.headers["location"]
                if self.is_connector(url):
                    self.hops.append((urlsplit(url).path, location))
                url = urljoin(url, location)
                continue
            picker = 'class="accounts"' in response.text and "/oauth2/v2.0/authorize" in url
            if picker and upn is not None:
                link = re.search(
                    r'<a class="account[^"]*" data-upn="'
                    + re.escape(html.escape(upn))
                    + r'"[^>]*href="([^"]+)"',
                    response.text,
                )
                assert link, "no account link on the Entra picker"
                url = urljoin(url, html.unescape(link.group(1)))
                continue
            return response
        raise AssertionError("too many redirects")


def _allowed(stack: Stack, location: str, *, portal: str | None = None) -> str:
    """Which trusted target ``location`` is ('ehr', 'entra', 'meeting', 'portal'), else fail."""
    assert EVIL_HOST not in location and "javascript:" not in location, location
    assert "\r" not in location and "\n" not in location
    parts = urlsplit(location)
    assert parts.scheme in ("http", "https") and parts.netloc, location
    ehr = stack.sandbox.ehr
    if location.startswith(ehr.authorization_endpoint + "?"):
        return "ehr"
    if location.startswith(stack.sandbox.entra.url + "/") and "/oauth2/v2.0/authorize?" in location:
        return "entra"
    if location.startswith(stack.sandbox.graph.url + "/l/meetup-join/"):
        stack.sandbox.graph.meeting_by_join_url(location.replace("&anon=true", ""))  # a real one
        return "meeting"
    if portal is not None and location.startswith(portal + "?"):
        return "portal"
    raise AssertionError(f"redirect to an untrusted place: {location}")


def test_launch_flows_redirect_only_to_trusted_places(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    forget_mapping(s, practitioner)  # first launch: the Microsoft sign-in (sso-callback route)
    walk = Walk(s)
    ehr = s.sandbox.ehr

    # the patient comes first and waits (launch/patient, launch/callback)
    patient = s.browser(follow_redirects=False)
    waiting = walk.run(patient, ehr.launch_url(config.id, appointment_id=SOLO, user="patient"))
    assert waiting.status_code == 200 and "will start soon" in waiting.text

    # the clinician's first launch (launch/provider, callback, Entra, sso-callback)
    upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
    clinician = s.browser(follow_redirects=False)
    landed = walk.run(
        clinician, ehr.launch_url(config.id, appointment_id=SOLO, user="clinician"), upn=upn
    )
    assert landed.status_code == 200 and 'class="join-page"' in landed.text

    # the waiting page moves on (launch/wait); a second patient goes straight in
    moved = walk.run(patient, f"{s.api}/launch/wait")
    assert 'class="join-page"' in moved.text
    second = walk.run(
        s.browser(follow_redirects=False),
        ehr.launch_url(config.id, appointment_id=SOLO, user="patient"),
    )
    assert 'class="join-page"' in second.text

    def route(path: str) -> str:
        return path.split("/api/", 1)[1].split("/" + config.id)[0]

    targets = {(route(path), _allowed(s, location)) for path, location in walk.hops}
    assert targets == {
        ("launch/provider", "ehr"),
        ("launch/patient", "ehr"),
        ("launch/callback", "entra"),  # the clinician's first launch
        ("launch/callback", "meeting"),  # the second patient
        ("launch/sso-callback", "meeting"),
        ("launch/wait", "meeting"),
    }, targets


@pytest.mark.parametrize(
    "query",
    [
        {"iss": f"https://{EVIL_HOST}/fhir/r4", "launch": "x"},
        {"iss": f"//{EVIL_HOST}/fhir/r4", "launch": "x"},
        {"iss": f"https://{EVIL_HOST}@127.0.0.1/fhir", "launch": "x"},
        {"iss": "javascript:alert(1)", "launch": "x"},
    ],
)
@pytest.mark.parametrize("role", ["provider", "patient"])
def test_launch_with_a_foreign_iss_is_a_page_not_a_redirect(
    stack: Stack, config: TenantConfig, role: str, query: dict[str, str]
) -> None:
    browser = stack.browser(follow_redirects=False)
    response = browser.get(f"{stack.api}/launch/{role}/{config.id}?{urlencode({**query, **EVIL})}")
    assert response.status_code == 403
    assert "location" not in response.headers
    assert EVIL_HOST not in response.text or html.escape(EVIL_HOST) in response.text
    assert "does not trust" in response.text


@pytest.mark.parametrize(
    "state",
    [f"https://{EVIL_HOST}/", f"//{EVIL_HOST}", "/\\evil.example", "javascript:alert(1)", ""],
)
@pytest.mark.parametrize(
    "route", ["launch/callback", "launch/sso-callback", "launch/wait", "ehr-signin/callback"]
)
def test_state_made_of_urls_is_refused_without_a_redirect(
    stack: Stack, route: str, state: str
) -> None:
    query = {"code": "x", "state": state, "iss": f"https://{EVIL_HOST}/fhir", **EVIL}
    response = stack.browser(follow_redirects=False).get(f"{stack.api}/{route}?{urlencode(query)}")
    assert 400 <= response.status_code < 500, (route, response.status_code)
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert "correlation id" in response.text


def test_a_real_state_with_an_error_uri_still_redirects_nowhere(
    stack: Stack, config: TenantConfig
) -> None:
    browser = stack.browser(follow_redirects=False)
    start = browser.get(
        stack.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
    )
    state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    query = {
        "state": state,
        "iss": stack.sandbox.ehr.issuer,  # RFC 9207: the EHR always sends it
        "error": "access_denied",
        "error_uri": f"https://{EVIL_HOST}/why",
        "error_description": f"see https://{EVIL_HOST}",
        **EVIL,
    }
    response = browser.get(f"{stack.api}/launch/callback?{urlencode(query)}")
    assert response.status_code == 403 and "location" not in response.headers
    assert EVIL_HOST not in response.text


def _approver_signin_callback(stack: Stack, config: TenantConfig) -> str:
    """The approver's EHR sign-in up to the connector's callback URL (not yet opened)."""
    token = stack.sandbox.entra.mint_access_token(
        tid=config.tenant_id, preferred_username=config.approver_upn
    )
    with stack.http() as api:
        started = api.post(
            f"/configs/{config.id}/ehr-signin", headers={"Authorization": f"Bearer {token}"}
        )
    assert started.status_code == 200, started.text
    browser = stack.browser(follow_redirects=False)
    page = browser.get(started.json()["authorizeUrl"])
    to_callback = browser.get(find_signin_link(page.text))
    assert to_callback.status_code == 302
    callback = to_callback.headers["location"]
    assert callback.startswith(f"{stack.api}/ehr-signin/callback?")
    return callback


@pytest.mark.parametrize("portal", [None, "https://portal.contoso.example/virtual-visits"])
def test_ehr_signin_callback_goes_only_to_the_configured_portal(
    stack: Stack, config: TenantConfig, monkeypatch: pytest.MonkeyPatch, portal: str | None
) -> None:
    container = stack.container()
    monkeypatch.setattr(
        container, "settings", container.settings.model_copy(update={"portal_url": portal})
    )
    callback = _approver_signin_callback(stack, config)
    response = stack.browser(follow_redirects=False).get(_with(callback, EVIL))
    if portal is None:
        assert response.status_code == 200 and "location" not in response.headers
        assert "EHR sign-in complete" in response.text
    else:
        assert response.status_code == 302
        assert _allowed(stack, response.headers["location"], portal=portal) == "portal"


# --- header injection -------------------------------------------------------------------------

CRLF_VALUES = [
    "x\r\nSet-Cookie: injected=1",
    "x\r\nLocation: https://evil.example/",
    "x%0d%0aX-Injected: 1",
    "x\nX-Injected: 1",
    "x\u2028X-Injected: 1",
]


def _no_injection(response: httpx.Response) -> None:
    names = {k.lower() for k in response.headers}
    assert "x-injected" not in names
    for name, value in response.headers.multi_items():
        assert "\r" not in value and "\n" not in value, (name, value)
        assert "injected=1" not in value, (name, value)
        if name.lower() == "location":  # values travel percent-encoded, hosts never change
            assert EVIL_HOST not in urlsplit(value).netloc, value


@pytest.mark.parametrize("value", CRLF_VALUES)
def test_line_breaks_in_query_values_never_reach_a_response_header(
    stack: Stack, config: TenantConfig, value: str
) -> None:
    browser = stack.browser(follow_redirects=False)
    ehr = stack.sandbox.ehr
    launch = ehr.make_launch(appointment_id=SOLO, user="clinician")
    urls = [
        # a launch that redirects to the EHR: the launch value travels into the Location
        f"{stack.api}/launch/provider/{config.id}?"
        + urlencode({"iss": ehr.fhir_base, "launch": launch + value}),
        f"{stack.api}/launch/patient/{config.id}?" + urlencode({"iss": value, "launch": value}),
        f"{stack.api}/launch/provider/{config.id}?"
        + urlencode({"iss": ehr.fhir_base + value, "launch": "x"}),
        f"{stack.api}/launch/callback?"
        + urlencode({"state": value, "code": value, "error": value}),
        f"{stack.api}/launch/sso-callback?" + urlencode({"state": value, "code": value}),
        f"{stack.api}/launch/wait?" + urlencode({"next": value}),
        f"{stack.api}/ehr-signin/callback?" + urlencode({"state": value, "code": value}),
    ]
    for url in urls:
        response = browser.get(url)
        assert response.status_code < 500, (url, response.status_code, response.text[:300])
        _no_injection(response)
    # the launch that went through carries the value encoded inside its Location only
    first = browser.get(urls[0])
    if first.status_code == 302:
        assert first.headers["location"].startswith(ehr.authorization_endpoint + "?")


def test_line_breaks_in_a_cookie_never_reach_a_response_header(
    stack: Stack, config: TenantConfig
) -> None:
    cookie = "__Host-vv-wait=abc%0d%0aX-Injected:1; __Host-vv-sso=x%0aSet-Cookie:injected=1"
    with httpx.Client(timeout=30) as raw:
        for route in ("launch/wait", "launch/sso-callback?state=x&code=y"):
            response = raw.get(f"{stack.api}/{route}", headers={"cookie": cookie})
            assert 400 <= response.status_code < 500
            _no_injection(response)
