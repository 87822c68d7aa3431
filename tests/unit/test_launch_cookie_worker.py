"""Launch cookies as Azure sends them, not only as the local host does.

devtools.host passes ``Set-Cookie`` headers through as written. In Azure the Python worker runs
each response through ``azure.functions``' ``HttpResponseConverter``: every ``Set-Cookie`` is
parsed with ``http.cookies.SimpleCookie`` and sent to the host as an ``RpcHttpCookie`` (name,
value, domain, path, expires, secure, http_only, same_site, max_age), which the host turns back
into a header. An attribute outside that list is lost, and one ``SimpleCookie`` cannot parse
(``Partitioned`` before Python 3.14) drops the whole cookie, silently. That is why the launch
pages set the partitioned copies a cross-site frame needs by script, in the body, which the worker
passes through as it is (``functions/launch.py``, FRAME_COOKIE_ATTRIBUTES).
"""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import azure.functions as func
import pytest
from azure.functions.http import HttpResponseConverter

from connector_core.service.launch import (
    LAUNCH_COOKIE_PREFIX,
    SSO_COOKIE,
    VISIT_COOKIE,
    WAIT_COOKIE,
    LaunchResult,
    SetCookie,
)
from functions import launch

# What RpcHttpCookie carries besides name and value (lower case, as SimpleCookie keys them).
_WORKER_ATTRIBUTES = frozenset(
    {"domain", "path", "expires", "secure", "httponly", "samesite", "max-age"}
)
_SEALED = "v1.AbC-_9xyz.QRS_tuv-123"  # the alphabet of sealed values and random tokens


def _set_cookies(response: func.HttpResponse) -> list[str]:
    return [v for k, v in response.headers.items() if k.lower() == "set-cookie"]


def _worker_cookies(response: func.HttpResponse) -> list[tuple[str, dict[str, object]]]:
    """The cookies the worker hands to the host for this response: (name, attributes)."""
    datum = HttpResponseConverter.encode(response, expected_type=None)
    jars: list[SimpleCookie] = datum.value["cookies"] or []
    return [
        (name, {"value": morsel.value, **{k: v for k, v in morsel.items() if v}})
        for jar in jars
        for name, morsel in jar.items()
    ]


def _every_launch_cookie() -> LaunchResult:
    return LaunchResult(
        redirect="https://ehr.example/authorize",
        cookies=(
            SetCookie(LAUNCH_COOKIE_PREFIX + "AbC-_9xyz12", _SEALED, 600),
            SetCookie(LAUNCH_COOKIE_PREFIX + "AbC-_9xyz12", "", 0),
            SetCookie(SSO_COOKIE, _SEALED, 600),
            SetCookie(WAIT_COOKIE, _SEALED, 4 * 3600),
            SetCookie(VISIT_COOKIE, _SEALED, 12 * 3600),
        ),
    )


@pytest.mark.parametrize("framed", [False, True], ids=["top-level", "framed"])
def test_every_launch_cookie_reaches_the_browser_through_the_worker_unchanged(
    framed: bool,
) -> None:
    result = _every_launch_cookie()
    response = launch._respond(result, framed=framed)
    assert response.status_code == (200 if framed else 302)
    headers = _set_cookies(response)
    sent = _worker_cookies(response)
    assert len(sent) == len(headers) == len(result.cookies), (headers, sent)
    for header, cookie, (name, attributes) in zip(headers, result.cookies, sent, strict=True):
        assert name == cookie.name and attributes["value"] == cookie.value
        written = {a.split("=", 1)[0].strip().lower() for a in header.split(";")[1:]}
        assert written <= _WORKER_ATTRIBUTES, f"lost in Azure: {written - _WORKER_ATTRIBUTES}"
        assert written == set(attributes) - {"value"}, (header, attributes)
        assert attributes["samesite"] == "None"
        assert attributes["secure"] is True and attributes["httponly"] is True
        assert attributes["path"] == "/" and "domain" not in attributes
        assert attributes["max-age"] == str(cookie.max_age)


def test_the_framed_page_and_its_policy_pass_through_the_worker_unchanged() -> None:
    response = launch._respond(_every_launch_cookie(), framed=True)
    datum = HttpResponseConverter.encode(response, expected_type=None)
    headers = {k.lower(): v.value for k, v in datum.value["headers"].items()}
    body = datum.value["body"].value
    assert body == response.get_body()
    nonce = re.search(r"'nonce-([^']+)'", headers["content-security-policy"])
    assert nonce and f'<script nonce="{nonce[1]}">'.encode() in body
    assert body.count(b"Partitioned") == len(_every_launch_cookie().cookies)
    assert headers["content-type"].startswith("text/html")


def test_a_partitioned_cookie_does_not_reach_the_browser_partitioned() -> None:
    """Why the launch cookies are not CHIPS cookies yet: the worker drops the cookie (Python
    before 3.14) or the flag (the host's cookie model has none)."""
    response = func.HttpResponse(status_code=302, headers={"Location": "https://x.example/"})
    response.headers.add(
        "Set-Cookie", "__Host-p=1; Max-Age=60; Path=/; Secure; HttpOnly; SameSite=None; Partitioned"
    )
    assert not any("partitioned" in attributes for _, attributes in _worker_cookies(response))
