"""Launches inside an EHR's cross-site iframe (Epic Hyperdrive embeds SMART apps this way).

A parent page on another site (``http://localhost:<port>``; the connector is at
``http://127.0.0.1:<port>``) frames the sandbox EHR's launch URLs. The patient waits in the frame,
the clinician signs in and reaches the meeting in a frame, the patient's waiting page then moves
into the same meeting: the launch-binding, SSO and wait cookies all come back inside the frame.
The connector's SameSite=None cookies do where the browser allows third-party cookies. Where
they are blocked (Chromium 156's default here) only a partitioned (CHIPS) cookie comes back, and
Azure's Python worker cannot send one in a header: so a frame navigation gets a small page whose
script sets the same cookies, partitioned, before it moves on. Without that page the launch fails
in such a browser, and the old SameSite=Lax cookie fails in every case: this test can fail.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from connector_core.domain.models import TenantConfig
from devtools._serve import ServerThread
from devtools.sandbox import seed
from functions import launch as launch_functions
from tests.chromium import ThirdPartyCookies, chromium_available, headless_chromium
from tests.e2e.launch.helpers import drop_config, forget_mapping, own_config
from tests.stack import Stack

pytestmark = pytest.mark.browser

APPOINTMENT = "appt-93af2c6b"
NOT_THIS_BROWSER = "did not start in this browser"
TIMEOUT = 30
# Chromium's own default (a new Chromium 156 profile blocks third-party cookies), and the
# "Allow"/"Block third-party cookies" settings.
COOKIE_SETTINGS = pytest.mark.parametrize("third_party", ["default", "allow", "block"])


# --- the parent page (the "EHR" on another site) and a cookie probe -----------------------


async def _embed(request: Request) -> HTMLResponse:
    src = request.query_params.get("src", "about:blank")
    return HTMLResponse(
        '<!doctype html><html><head><meta charset="utf-8"><title>EHR</title></head><body>'
        "<h1>EHR activity</h1>"
        f'<iframe id="app" name="app" width="1100" height="760" src="{html.escape(src)}">'
        "</iframe></body></html>"
    )


_PROBE_ATTRIBUTES = {
    "lax": "SameSite=Lax",
    "none": "SameSite=None",
    "partitioned": "SameSite=None; Partitioned",
}
# What the connector's framed pages do: a partitioned cookie set by script (so not HttpOnly).
_PROBE_SCRIPT = (
    "<script>document.cookie='__Host-probe-script=1; Path=/; Secure; SameSite=None; Partitioned';"
    "var p=document.createElement('p');p.id='set';document.body.appendChild(p);</script>"
)


async def _probe_set(request: Request) -> HTMLResponse:
    response = HTMLResponse(f"<body><p>setting cookies</p>{_PROBE_SCRIPT}</body>")
    for kind, attributes in _PROBE_ATTRIBUTES.items():
        response.headers.append(
            "set-cookie", f"__Host-probe-{kind}=1; Path=/; Secure; HttpOnly; {attributes}"
        )
    return response


async def _probe_echo(request: Request) -> HTMLResponse:
    names = sorted(
        part.split("=", 1)[0].strip()
        for part in request.headers.get("cookie", "").split(";")
        if part.strip()
    )
    return HTMLResponse(f"<pre id='cookies'>{html.escape(' '.join(names))}</pre>")


@pytest.fixture(scope="module")
def parent_site() -> Iterator[ServerThread]:
    app = Starlette(
        routes=[
            Route("/embed", _embed),
            Route("/probe/set", _probe_set),
            Route("/probe/echo", _probe_echo),
        ]
    )
    with ServerThread(app, name="ehr-parent-page") as server:
        yield server


def _parent_url(server: ServerThread) -> str:
    return f"http://localhost:{server.port}"  # another site than 127.0.0.1 (the connector)


def _embed_url(server: ServerThread, src: str) -> str:
    return f"{_parent_url(server)}/embed?{urlencode({'src': src})}"


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


# --- helpers --------------------------------------------------------------------------------


def _require_chromium() -> None:
    assert chromium_available(), "run `make browser-deps` (Debian chromium + chromium-driver)"


def _open_in_frame(driver: Any, server: ServerThread, src: str) -> None:
    """Load the parent page framing ``src`` and switch into the frame."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(_embed_url(server, src))
    WebDriverWait(driver, TIMEOUT).until(ec.frame_to_be_available_and_switch_to_it("app"))


def _frame_location(driver: Any) -> str:
    return str(driver.execute_script("return window.location.href"))


def _frame_text(driver: Any) -> str:
    return str(driver.execute_script("return document.body ? document.body.innerText : ''"))


def _wait_for(driver: Any, css: str, *, clickable: bool = False) -> Any:
    """An element inside the current frame; on timeout, say what the frame shows instead."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    condition = ec.element_to_be_clickable if clickable else ec.presence_of_element_located
    try:
        return WebDriverWait(driver, TIMEOUT).until(condition((By.CSS_SELECTOR, css)))
    except TimeoutException:
        pytest.fail(f"no {css!r} in the frame at {_frame_location(driver)}: {_frame_text(driver)}")


def _assert_still_framed(driver: Any, server: ServerThread) -> None:
    """The top-level page is still the EHR's: nothing broke out of the frame."""
    driver.switch_to.default_content()
    assert driver.current_url.startswith(f"{_parent_url(server)}/embed")
    driver.switch_to.frame("app")


# --- the browser itself: which cookies come back inside a cross-site frame -----------------


@COOKIE_SETTINGS
def test_which_cookies_come_back_in_a_cross_site_frame(
    parent_site: ServerThread, third_party: ThirdPartyCookies
) -> None:
    """Chromium's behaviour the fix relies on: a Lax cookie is never stored in a cross-site
    frame; an unpartitioned SameSite=None cookie is a third-party cookie (gone when they are
    blocked); a partitioned one, from a header or from script, comes back either way, and only
    under the same top-level site."""
    _require_chromium()
    probe = f"http://127.0.0.1:{parent_site.port}/probe"  # the parent's server, as another site
    with headless_chromium(third_party_cookies=third_party) as driver:
        _open_in_frame(driver, parent_site, f"{probe}/set")
        _wait_for(driver, "#set")  # after the script
        driver.get(f"{probe}/echo")  # top level, outside the EHR page
        top_level = _wait_for(driver, "#cookies").text.split()
        _open_in_frame(driver, parent_site, f"{probe}/echo")
        framed = _wait_for(driver, "#cookies").text.split()
    assert "__Host-probe-partitioned" in framed and "__Host-probe-script" in framed
    assert "__Host-probe-lax" not in framed
    if third_party != "default":
        assert ("__Host-probe-none" in framed) == (third_party == "allow")
    for partitioned in ("__Host-probe-partitioned", "__Host-probe-script"):
        assert partitioned not in top_level  # keyed to the EHR's site only


# --- the connector's launches inside the frame ----------------------------------------------

LAX = "Path=/; Secure; HttpOnly; SameSite=Lax"  # before embedded launches were supported
CHIPS = "Path=/; Secure; HttpOnly; SameSite=None; Partitioned"  # not deployable yet: see below
# The connector's cookies, with or without the framed page that sets them again by script.
CASES = {
    "deployed": (launch_functions.COOKIE_ATTRIBUTES, launch_functions.FRAME_DESTINATIONS),
    "headers-only": (launch_functions.COOKIE_ATTRIBUTES, frozenset[str]()),
    "partitioned": (CHIPS, frozenset[str]()),
    "lax": (LAX, frozenset[str]()),
}


def _kept_in_frame(attributes: str, frame_page: bool, third_party: ThirdPartyCookies) -> bool:
    """What the probe test above shows Chromium does with a cookie set in a cross-site frame:
    the framed page's script cookies are partitioned (FRAME_COOKIE_ATTRIBUTES)."""
    if frame_page or "Partitioned" in attributes:
        return True
    return "SameSite=None" in attributes and third_party == "allow"


def _framed_page_script(page: str) -> tuple[str, list[str], str]:
    """(nonce, cookies, raw redirect argument) of the one script on a framed launch page."""
    (found,) = re.findall(r'<script nonce="([^"]+)">(.*?)</script>', page, re.S)
    nonce, script = found
    cookies = re.search(r"var c=(\[.*?\]);", script)
    target = re.search(r"location\.replace\((.*?)\);", script)
    assert cookies and target, script
    return nonce, json.loads(cookies.group(1)), target.group(1)


def test_launch_responses_set_cross_site_cookies_and_may_be_framed(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
    with httpx.Client(follow_redirects=False, timeout=30.0) as client:
        response = client.get(url)
        error_page = client.get(f"{s.api}/launch/callback", params={"state": "x", "code": "y"})
        health = client.get(f"{s.api}/health")
    assert response.status_code == 302, response.text[:500]
    (cookie,) = response.headers.get_list("set-cookie")
    attributes = [a.strip() for a in cookie.split(";")]
    assert attributes[0].startswith("__Host-vvl-")
    for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=None", "Max-Age=600"):
        assert attribute in attributes
    assert not any(a.lower().startswith(("domain", "samesite=lax")) for a in attributes)
    for framed in (response, error_page):
        assert "frame-ancestors *" in framed.headers["content-security-policy"]
        assert "x-frame-options" not in framed.headers
    assert error_page.status_code >= 400 and "text/html" in error_page.headers["content-type"]
    assert "frame-ancestors" not in health.headers.get("content-security-policy", "")


def test_a_frame_navigation_gets_a_page_that_also_sets_partitioned_cookies(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    """Through the local host, as a browser's frame navigation: the same Set-Cookie header,
    and a page whose nonce'd script sets the cookie partitioned and goes to the EHR."""
    s = fresh_stack
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
    with httpx.Client(follow_redirects=False, timeout=30.0) as client:
        response = client.get(url, headers={"Sec-Fetch-Dest": "iframe"})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    (cookie,) = response.headers.get_list("set-cookie")
    assert "HttpOnly" in cookie and "SameSite=None" in cookie
    nonce, (partitioned,), target = _framed_page_script(response.text)
    csp = [d.strip() for d in response.headers["content-security-policy"].split(";")]
    assert f"script-src 'nonce-{nonce}'" in csp
    assert {"default-src 'none'", "base-uri 'none'", "frame-ancestors *"} <= set(csp)
    assert partitioned.startswith(cookie.split(";", 1)[0] + ";")  # same name and value
    assert "Partitioned" in partitioned and "HttpOnly" not in partitioned
    assert "&" not in target and "<" not in target  # JSON, escaped for a script element
    assert json.loads(target).startswith(s.sandbox.ehr.authorization_endpoint + "?")


def _framed_launches_reach_the_meeting(
    s: Stack, config: TenantConfig, server: ServerThread, driver: Any
) -> None:
    """The patient waits in the frame, the clinician signs in to Microsoft and reaches the
    meeting in a frame (and again without sign-in), then the patient's waiting page moves into
    the same meeting: launch-binding, SSO and wait cookies all come back inside the frame."""
    practitioner = seed.APPOINTMENTS[APPOINTMENT].practitioner_id
    forget_mapping(s, practitioner)  # the clinician's first launch: Microsoft sign-in
    upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
    ehr = s.sandbox.ehr

    _open_in_frame(
        driver, server, ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="patient")
    )
    _wait_for(driver, "p.waiting")
    assert _frame_location(driver).startswith(f"{s.api}/launch/callback")
    assert NOT_THIS_BROWSER not in _frame_text(driver)
    _assert_still_framed(driver, server)
    patient_window = driver.current_window_handle

    driver.switch_to.new_window("window")  # the clinician, in another EHR window
    _open_in_frame(
        driver, server, ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
    )
    _wait_for(driver, f'a.account[data-upn="{upn}"]', clickable=True).click()
    page = _wait_for(driver, ".join-page")
    meeting = page.get_attribute("data-meeting-id")
    assert meeting and page.get_attribute("data-mode") == "all"
    assert _frame_location(driver).startswith(s.sandbox.graph_url)
    _assert_still_framed(driver, server)

    _open_in_frame(
        driver, server, ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
    )
    assert _wait_for(driver, ".join-page").get_attribute("data-meeting-id") == meeting
    driver.close()

    # the waiting page polls /launch/wait (with its cookie, in the frame) and moves in
    driver.switch_to.window(patient_window)
    driver.switch_to.frame("app")
    page = _wait_for(driver, ".join-page")
    assert page.get_attribute("data-meeting-id") == meeting
    assert page.get_attribute("data-mode") == "guest"
    assert "anon=true" in _frame_location(driver)
    _assert_still_framed(driver, server)


def _framed_launch_is_refused(
    s: Stack, config: TenantConfig, server: ServerThread, driver: Any
) -> None:
    """The browser-binding cookie does not come back: the friendly error page, in the frame."""
    _open_in_frame(
        driver,
        server,
        s.sandbox.ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="patient"),
    )
    _wait_for(driver, "p.what")
    assert NOT_THIS_BROWSER in _frame_text(driver)
    assert urlsplit(_frame_location(driver)).path == "/api/launch/callback"


@pytest.mark.parametrize(
    ("cookies", "third_party"),
    [
        ("deployed", "default"),
        ("deployed", "allow"),
        ("deployed", "block"),
        ("headers-only", "allow"),
        ("headers-only", "block"),
        ("partitioned", "allow"),
        ("partitioned", "block"),
        ("lax", "allow"),
    ],
)
def test_launches_inside_a_cross_site_frame(
    fresh_stack: Stack,
    config: TenantConfig,
    parent_site: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    cookies: str,
    third_party: ThirdPartyCookies,
) -> None:
    """``deployed``: the connector as it is (SameSite=None headers, and for frame navigations
    the page whose script sets them again, partitioned), which must work with third-party
    cookies blocked, a new Chromium profile's default. The others have no framed page:
    ``headers-only`` (the SameSite=None headers alone) fails where they are blocked;
    ``partitioned`` (CHIPS headers) would work, but Azure's Python worker drops them
    (tests/unit/test_launch_cookie_worker.py); ``lax`` was the behaviour before embedded
    launches and fails even with third-party cookies allowed: this test can fail."""
    _require_chromium()
    attributes, frame_destinations = CASES[cookies]
    monkeypatch.setattr(launch_functions, "COOKIE_ATTRIBUTES", attributes)
    monkeypatch.setattr(launch_functions, "FRAME_DESTINATIONS", frame_destinations)
    with headless_chromium(third_party_cookies=third_party) as driver:
        if _kept_in_frame(attributes, bool(frame_destinations), third_party):
            _framed_launches_reach_the_meeting(fresh_stack, config, parent_site, driver)
        else:
            _framed_launch_is_refused(fresh_stack, config, parent_site, driver)
