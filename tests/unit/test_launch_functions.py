"""functions/launch.py: real func.HttpRequest in, 302 / cookies / HTML pages out."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
import pytest

from connector_core.bootstrap import set_container
from connector_core.service import launch as launch_service
from connector_core.service.launch import LAUNCH_COOKIE_PREFIX, WAIT_COOKIE, LaunchResult, SetCookie
from functions import launch
from functions._http import request_cookies
from tests.unit.launch_fakes import AS_ISSUER, FHIR, World, make_world


@pytest.fixture
def world() -> Iterator[World]:
    w = make_world()
    set_container(w.container)
    yield w
    set_container(None)


def _get(
    route: str,
    params: dict[str, str],
    *,
    cookies: str = "",
    dest: str | None = None,
    accept: str | None = None,
    **route_params: str,
) -> func.HttpRequest:
    """``dest``: the browser's ``Sec-Fetch-Dest`` ("iframe" for a frame navigation)."""
    headers = {"cookie": cookies} if cookies else {}
    if dest is not None:
        headers["sec-fetch-dest"] = dest
    if accept is not None:
        headers["accept"] = accept
    return func.HttpRequest(
        method="GET",
        url=f"http://127.0.0.1:7071/api/{route}",
        params=params,
        route_params=route_params,
        headers=headers,
        body=b"",
    )


def _set_cookies(response: func.HttpResponse) -> list[str]:
    return [v for k, v in response.headers.items() if k.lower() == "set-cookie"]


def _cookie_header(set_cookies: list[str]) -> str:
    return "; ".join(c.split(";", 1)[0] for c in set_cookies)


def test_provider_launch_redirects_with_a_host_cookie(world: World) -> None:
    response = launch.launch_provider(
        _get("launch/provider/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    assert response.status_code == 302
    assert response.headers["Location"].startswith("https://ehr.example/oauth2/authorize?")
    assert response.headers["Cache-Control"] == "no-store"
    (cookie,) = _set_cookies(response)
    assert cookie.startswith("__Host-vvl-")
    attributes = [a.strip() for a in cookie.split(";")[1:]]
    # What a __Host- binding cookie needs, whatever the framing choice ...
    for attribute in ("Path=/", "Secure", "HttpOnly", "Max-Age=600"):
        assert attribute in attributes
    # ... and the cross-site (EHR iframe) attributes the launch functions declare.
    same_site = [a for a in attributes if a.startswith("SameSite=")]
    assert same_site and same_site[0] in ("SameSite=Lax", "SameSite=None")
    for attribute in launch.COOKIE_ATTRIBUTES.split(";"):
        assert attribute.strip() in attributes
    assert "Domain" not in cookie


def test_callback_sets_and_clears_several_cookies(world: World) -> None:
    world.map_clinician()
    start = launch.launch_provider(
        _get("launch/provider/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    state = parse_qs(urlsplit(start.headers["Location"]).query)["state"][0]
    response = launch.launch_callback(
        _get(
            "launch/callback",
            {"code": "c", "state": state, "iss": AS_ISSUER},
            cookies=_cookie_header(_set_cookies(start)),
        )
    )
    assert response.status_code == 302
    assert response.headers["Location"].startswith("https://teams.example/")
    cookies = _set_cookies(response)
    assert len(cookies) == 2
    assert any(c.startswith("__Host-vvl-") and "Max-Age=0" in c for c in cookies)
    assert any(c.startswith("__Host-vv-visit=") for c in cookies)


def test_errors_are_friendly_pages_with_a_correlation_id(world: World) -> None:
    response = launch.launch_provider(
        _get(
            "launch/provider/x",
            {"iss": "https://evil.example/fhir", "launch": "L"},
            configId=world.config.id,
        )
    )
    assert response.status_code == 403
    assert response.mimetype == "text/html"
    page = response.get_body().decode()
    assert "does not trust" in page
    assert "EHR analyst" in page
    assert response.headers["x-correlation-id"] in page
    assert "Traceback" not in page


def test_forged_state_page(world: World) -> None:
    response = launch.launch_callback(_get("launch/callback", {"code": "c", "state": "AQforged"}))
    assert response.status_code == 401
    assert "not valid" in response.get_body().decode()


def test_waiting_page_refreshes_itself(world: World) -> None:
    world.smart.fhir_user = f"{FHIR}/Patient/p"
    start = launch.launch_patient(
        _get("launch/patient/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    state = parse_qs(urlsplit(start.headers["Location"]).query)["state"][0]
    response = launch.launch_callback(
        _get(
            "launch/callback",
            {"code": "c", "state": state, "iss": AS_ISSUER},
            cookies=_cookie_header(_set_cookies(start)),
        )
    )
    assert response.status_code == 200
    page = response.get_body().decode()
    assert 'http-equiv="refresh"' in page and "/api/launch/wait" in page
    wait_cookie = [c for c in _set_cookies(response) if c.startswith("__Host-vv-wait=")]
    assert wait_cookie
    again = launch.launch_wait(_get("launch/wait", {}, cookies=_cookie_header(wait_cookie)))
    assert again.status_code == 200


def test_cookie_parsing_takes_the_first_value() -> None:
    request = _get("launch/wait", {}, cookies='a=1; b="2"; a=3; junk')
    assert request_cookies(request) == {"a": "1", "b": "2"}


def _started(world: World) -> tuple[str, str]:
    start = launch.launch_provider(
        _get("launch/provider/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    state = parse_qs(urlsplit(start.headers["Location"]).query)["state"][0]
    return state, _cookie_header(_set_cookies(start))


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"iss": FHIR}, "another server"),
        ({}, "does not say which server issued it"),
        ({"iss": FHIR, "error": "access_denied"}, "another server"),
    ],
    ids=["fhir-base-as-iss", "no-iss", "error-with-fhir-base-as-iss"],
)
def test_callback_with_a_mixed_up_or_missing_iss_is_a_401_page(
    world: World, params: dict[str, str], text: str
) -> None:
    world.map_clinician()
    state, cookies = _started(world)
    query = {"state": state, **({} if "error" in params else {"code": "c"}), **params}
    response = launch.launch_callback(_get("launch/callback", query, cookies=cookies))
    assert response.status_code == 401
    assert response.mimetype == "text/html"
    assert text in response.get_body().decode()
    assert world.smart.exchanges == []


# --- inside an EHR's cross-site frame: the page that also sets partitioned cookies -------------


class _Elements(HTMLParser):
    """Every element a browser would build from the page, and the scripts' nonces and text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.scripts: list[tuple[str | None, str]] = []
        self._in_script: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "script":
            self._in_script = dict(attrs).get("nonce") or ""
            self.scripts.append((self._in_script, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            nonce, text = self.scripts[-1]
            self.scripts[-1] = (nonce, text + data)


def _framed_page(response: func.HttpResponse) -> tuple[_Elements, list[str], str | None]:
    """The page's elements, the cookies its one script sets, and where it then goes."""
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = _Elements()
    page.feed(response.get_body().decode())
    (nonce, script), *others = page.scripts
    # a waiting page adds its background poll (same nonce), nothing else
    assert [n for n, _ in others] == [nonce] * len(others) and len(others) <= 1
    assert all("/api/launch/wait" in text and "fetch(" in text for _, text in others)
    csp = [d.strip() for d in response.headers["Content-Security-Policy"].split(";")]
    assert nonce and f"script-src 'nonce-{nonce}'" in csp
    assert {"default-src 'none'", "base-uri 'none'", "frame-ancestors *"} <= set(csp)
    cookies = re.fullmatch(
        r"\s*var c=(\[.*?\]);\s*c\.forEach\(function\(v\)\{document\.cookie=v;\}\);"
        r"(?:\s*location\.replace\((.*)\);)?\s*",
        script,
        re.S,
    )
    assert cookies, script
    target = cookies.group(2)
    return page, json.loads(cookies.group(1)), None if target is None else json.loads(target)


def _expected_script_cookie(header: str) -> str:
    """A Set-Cookie header's cookie as the framed page's script sets it."""
    name_value, rest = header.split(";", 1)
    max_age = next(a.strip() for a in rest.split(";") if a.strip().startswith("Max-Age="))
    return f"{name_value}; {max_age}; {launch.FRAME_COOKIE_ATTRIBUTES}"


def test_a_framed_launch_gets_a_page_that_sets_partitioned_cookies_then_redirects(
    world: World,
) -> None:
    response = launch.launch_provider(
        _get(
            "launch/provider/x",
            {"iss": FHIR, "launch": "L"},
            dest="iframe",
            configId=world.config.id,
        )
    )
    page, script_cookies, target = _framed_page(response)
    assert "Location" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    # the Set-Cookie header is still sent, exactly as for a top-level launch ...
    (header,) = _set_cookies(response)
    assert header.startswith(LAUNCH_COOKIE_PREFIX)
    for attribute in launch.COOKIE_ATTRIBUTES.split(";"):
        assert attribute.strip() in header
    # ... and the script sets the same cookie (name and value), partitioned and not HttpOnly
    assert script_cookies == [_expected_script_cookie(header)]
    assert "Partitioned" in script_cookies[0] and "HttpOnly" not in script_cookies[0]
    assert target is not None and target.startswith("https://ehr.example/oauth2/authorize?")
    assert page.tags.count("noscript") == 1 and page.tags.count("a") == 1


def test_each_framed_page_has_its_own_nonce(world: World) -> None:
    nonces: set[str | None] = set()
    for _ in range(3):
        response = launch.launch_provider(
            _get(
                "launch/provider/x",
                {"iss": FHIR, "launch": "L"},
                dest="iframe",
                configId=world.config.id,
            )
        )
        page, _, _ = _framed_page(response)  # the CSP's nonce is the script's
        nonces.add(page.scripts[0][0])
    assert len(nonces) == 3


@pytest.mark.parametrize("dest", [None, "document", "empty", "IFRAMES"])
def test_a_top_level_launch_gets_the_plain_redirect(world: World, dest: str | None) -> None:
    response = launch.launch_provider(
        _get("launch/provider/x", {"iss": FHIR, "launch": "L"}, dest=dest, configId=world.config.id)
    )
    assert response.status_code == 302
    assert response.headers["Location"].startswith("https://ehr.example/oauth2/authorize?")
    assert response.get_body() == b""
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert len(_set_cookies(response)) == 1


@pytest.mark.parametrize("dest", ["iframe", "frame", "IFrame"])
def test_a_framed_callback_sets_and_clears_cookies_by_script_too(world: World, dest: str) -> None:
    world.map_clinician()
    state, cookies = _started(world)
    response = launch.launch_callback(
        _get(
            "launch/callback",
            {"code": "c", "state": state, "iss": AS_ISSUER},
            cookies=cookies,
            dest=dest,
        )
    )
    _, script_cookies, target = _framed_page(response)
    headers = _set_cookies(response)
    assert len(headers) == 2
    assert script_cookies == [_expected_script_cookie(h) for h in headers]
    assert any(c.startswith(LAUNCH_COOKIE_PREFIX) and "Max-Age=0;" in c for c in script_cookies)
    assert target is not None and target.startswith("https://teams.example/")


def test_the_framed_waiting_page_sets_its_cookie_by_script_and_still_polls(
    world: World,
) -> None:
    world.smart.fhir_user = f"{FHIR}/Patient/p"
    start = launch.launch_patient(
        _get(
            "launch/patient/x",
            {"iss": FHIR, "launch": "L"},
            dest="iframe",
            configId=world.config.id,
        )
    )
    authorize = _framed_page(start)[2]
    assert authorize is not None
    state = parse_qs(urlsplit(authorize).query)["state"][0]
    response = launch.launch_callback(
        _get(
            "launch/callback",
            {"code": "c", "state": state, "iss": AS_ISSUER},
            cookies=_cookie_header(_set_cookies(start)),
            dest="iframe",
        )
    )
    _, script_cookies, target = _framed_page(response)
    assert target is None  # the page stays and asks /launch/wait in the background
    body = response.get_body().decode()
    assert "/api/launch/wait" in body and "fetch(" in body
    # the refresh only for browsers without script (axe: no meta-refresh with script on)
    assert '<noscript><meta http-equiv="refresh"' in body
    assert 'class="waiting"' in body
    assert script_cookies == [_expected_script_cookie(h) for h in _set_cookies(response)]
    assert any(c.startswith(WAIT_COOKIE + "=") and "Partitioned" in c for c in script_cookies)
    # later polls set no cookie: the plain waiting page with only its poll, no cookie script
    wait = [c for c in _set_cookies(response) if c.startswith(WAIT_COOKIE + "=")]
    again = launch.launch_wait(_get("launch/wait", {}, cookies=_cookie_header(wait), dest="iframe"))
    text = again.get_body().decode()
    assert again.status_code == 200 and "document.cookie" not in text and "fetch(" in text
    # the background question gets JSON: not ready yet
    asked = launch.launch_wait(
        _get("launch/wait", {}, cookies=_cookie_header(wait), accept="application/json")
    )
    assert asked.mimetype == "application/json"
    assert json.loads(asked.get_body()) == {"ready": False, "url": None}


HOSTILE_TARGET = (
    "https://teams.example/l/meetup-join/x?a=1&b=</script><script>alert(1)</script>"
    "&c=\u2028\u2029&d=<!--&e=\"'"
)
HOSTILE_VALUE = "</script><svg/onload=alert(1)><!--"


def test_hostile_values_cannot_leave_the_script(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = LaunchResult(
        redirect=HOSTILE_TARGET,
        cookies=(SetCookie(WAIT_COOKIE, HOSTILE_VALUE, 60), SetCookie("__Host-vv-sso", "", 0)),
    )
    monkeypatch.setattr(launch_service, "poll_waiting", lambda *a, **k: result)
    response = launch.launch_wait(_get("launch/wait", {}, dest="iframe"))
    page, script_cookies, target = _framed_page(response)  # exactly one script element
    assert target == HOSTILE_TARGET  # exactly the service's target, decoded
    assert script_cookies[0].startswith(f"{WAIT_COOKIE}={HOSTILE_VALUE};")
    assert "svg" not in page.tags and page.tags.count("script") == 1
    body = response.get_body().decode()
    script = body[body.index("<script") : body.index("</script>")].split(">", 1)[1]
    for unsafe in ("<", ">", "&", "\u2028", "\u2029"):  # "</script", "<!--", JS line breaks
        assert unsafe not in script
    # the <noscript> link: HTML-escaped (quotes too), so it decodes to exactly the target
    (href,) = re.findall(r'<a href="([^"<>]*)">', body)
    assert html.unescape(href) == HOSTILE_TARGET


@pytest.mark.parametrize(
    "result",
    [
        LaunchResult(redirect="https://teams.example/\r\nSet-Cookie: x=1"),
        LaunchResult(redirect="javascript:alert(1)", cookies=(SetCookie(WAIT_COOKIE, "v", 60),)),
        LaunchResult(
            redirect="https://x.example/", cookies=(SetCookie(WAIT_COOKIE, "v; Domain=x", 60),)
        ),
        LaunchResult(
            redirect="https://x.example/", cookies=(SetCookie(WAIT_COOKIE, "v\r\nX: 1", 60),)
        ),
        LaunchResult(waiting=True, cookies=(SetCookie("__Host-a;b", "v", 60),)),
    ],
    ids=["crlf-target", "javascript-target", "attribute-in-value", "crlf-in-value", "bad-name"],
)
@pytest.mark.parametrize("dest", [None, "iframe"])
def test_unsafe_results_are_an_error_page_not_a_header_or_script(
    world: World, monkeypatch: pytest.MonkeyPatch, result: LaunchResult, dest: str | None
) -> None:
    monkeypatch.setattr(launch_service, "poll_waiting", lambda *a, **k: result)
    response = launch.launch_wait(_get("launch/wait", {}, dest=dest))
    assert response.status_code == 500
    assert "Location" not in response.headers and not _set_cookies(response)
    assert "<script" not in response.get_body().decode()
