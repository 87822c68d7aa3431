"""Virtual visit launch (browser routes): SMART EHR launch, callbacks, the patient's waiting page.

GET /api/launch/provider/{configId}?iss&launch   GET /api/launch/patient/{configId}?iss&launch
GET /api/launch/callback?code&state (or error)   GET /api/launch/sso-callback?code&state
GET /api/launch/wait                              (the patient's waiting page polls here)

Thin: parse the request, call connector_core.service.launch, answer a 302 (Location checked by
the service), the waiting page, or (via ``@browser``) the friendly error page. These routes work
inside an EHR's cross-site iframe: ``SameSite=None`` cookies, ``frame-ancestors *``, and for a
frame navigation (``Sec-Fetch-Dest: iframe``) that sets cookies, a small page that also sets them
as partitioned cookies by script before it moves on (see ``FRAME_COOKIE_ATTRIBUTES``).
"""

from __future__ import annotations

import functools
import json
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import azure.functions as func

from connector_core.logs import correlation_id
from functions._http import Handler, browser, container, request_cookies

if TYPE_CHECKING:
    from connector_core.service.launch import LaunchResult, SetCookie

bp = func.Blueprint()

WAIT_REFRESH_SECONDS = 5
_NO_STORE = "no-store"
_WAIT_PATH = "/api/launch/wait"
# EHRs open launches in embedded browsers, at times in a cross-site iframe (Epic Hyperdrive),
# where a SameSite=Lax cookie is never stored: SameSite=None lets the frame keep it wherever the
# browser allows third-party cookies. Not Partitioned (CHIPS) here, which would also work where
# they are blocked: the Functions Python worker parses Set-Cookie with http.cookies, which drops a
# cookie carrying it, and the host's cookie model has no such flag (test_launch_cookie_worker.py).
# Framed responses set the same cookies again by script, partitioned (FRAME_COOKIE_ATTRIBUTES).
# The binding is unchanged: the cookie carries a secret whose hash is sealed in the single-use
# state, so sending it cross-site gives another site nothing it could use.
COOKIE_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=None"
# Where third-party cookies are blocked (a new Chromium profile's default), a frame keeps only
# partitioned cookies, which a header cannot carry through Azure (above): a frame navigation gets
# a page whose nonce'd script sets each cookie with the same name and value, partitioned to the
# EHR's site, then replaces itself with the redirect target. The server reads them unchanged.
# Trade-off: a cookie set by script cannot be HttpOnly; these values are a random binding secret
# or sealed, short-lived blobs, and our launch pages run no script but that nonce'd one.
FRAME_COOKIE_ATTRIBUTES = "Path=/; Secure; SameSite=None; Partitioned"
# Fetch Metadata destinations of a frame navigation (a top-level one is "document").
FRAME_DESTINATIONS = frozenset({"iframe", "frame"})
# Nothing to clickjack (302s, a passive waiting page, text-only errors): any EHR may frame these.
_LAUNCH_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
    "frame-ancestors *"
)
# RFC 6265 cookie-name (token) and cookie-value (cookie-octets): nothing that could add an
# attribute, end the header or leave a JavaScript string.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_COOKIE_OCTETS = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset('",;\\')


def _query(req: func.HttpRequest) -> dict[str, str]:
    return {k: v for k, v in req.params.items() if isinstance(v, str)}


def _in_frame(req: func.HttpRequest) -> bool:
    """A frame navigation, by Fetch Metadata (browsers send it to https and loopback origins)."""
    return req.headers.get("sec-fetch-dest", "").strip().lower() in FRAME_DESTINATIONS


def _cookie_pair(cookie: SetCookie) -> str:
    """``name=value``, refused unless both are plain RFC 6265 (never CR/LF, ``;`` or quotes)."""
    if not cookie.name or not set(cookie.name) <= _TOKEN or not set(cookie.value) <= _COOKIE_OCTETS:
        raise ValueError("cookie name or value outside RFC 6265")
    return f"{cookie.name}={cookie.value}"


def _set_cookie(cookie: SetCookie) -> str:
    return f"{_cookie_pair(cookie)}; Max-Age={int(cookie.max_age)}; {COOKIE_ATTRIBUTES}"


def _script_cookie(cookie: SetCookie) -> str:
    """The same cookie for ``document.cookie``, partitioned (``Max-Age=0`` deletes it)."""
    return f"{_cookie_pair(cookie)}; Max-Age={int(cookie.max_age)}; {FRAME_COOKIE_ATTRIBUTES}"


def _script_json(value: object) -> str:
    """JSON that cannot end the ``<script>`` element or break a JavaScript string."""
    text = json.dumps(value, ensure_ascii=True)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _frameable(handler: Handler) -> Handler:
    """Outside ``@browser``, so its error pages can show inside the EHR's frame too."""

    @functools.wraps(handler)
    def wrapper(req: func.HttpRequest) -> func.HttpResponse:
        response = handler(req)
        if "Content-Security-Policy" not in response.headers:  # a framed page sets its own
            response.headers["Content-Security-Policy"] = _LAUNCH_CSP
        return response

    return wrapper


def _cookie_script(cookies: tuple[SetCookie, ...], redirect: str | None, nonce: str) -> str:
    """Sets ``cookies`` as partitioned cookies, then (if given) replaces the page with
    ``redirect``: the service's checked target, as data, never from the request."""
    lines = [
        f"var c={_script_json([_script_cookie(c) for c in cookies])};",
        "c.forEach(function(v){document.cookie=v;});",
    ]
    if redirect is not None:
        lines.append(f"location.replace({_script_json(redirect)});")
    body = "\n".join(lines)
    return f'<script nonce="{nonce}">\n{body}\n</script>'


def _locale(req: func.HttpRequest | None) -> tuple[str, bool]:
    """The page language (``?lang=``, the language cookie, ``Accept-Language``) and whether
    the switch picked it."""
    from connector_core.service.portal_web import public

    return public.locale_for(req.headers, req.params) if req is not None else ("en", False)


def _poll_script(nonce: str) -> str:
    """The waiting page asks ``/api/launch/wait`` (JSON) every few seconds in the background and
    goes to the visit once it is ready: no reloads that interrupt a screen reader (WCAG 2.2.1,
    axe ``meta-refresh``). An error answer (expired, other browser) loads the page's HTML
    version, which says what happened."""
    ms = WAIT_REFRESH_SECONDS * 1000
    url = _script_json(_WAIT_PATH)
    body = (
        f"(function(){{var u={url};function again(){{setTimeout(ask,{ms});}}"
        'function ask(){fetch(u,{credentials:"same-origin",headers:{Accept:"application/json"}})'
        ".then(function(r){if(r.status>=400){location.replace(u);return null;}"
        "return r.ok?r.json():null;})"
        ".then(function(d){if(d&&d.ready&&d.url){location.replace(d.url);}else{again();}},again);}"
        "again();})();"
    )
    return f'<script nonce="{nonce}">\n{body}\n</script>'


def _waiting_page(req: func.HttpRequest | None, script: str = "") -> str:
    """The patient's waiting page, in their language (see ``_poll_script``)."""
    from connector_core.service.portal_web import public

    locale, chosen = _locale(req)
    return public.waiting_html(
        locale=locale,
        chosen=chosen,
        refresh_seconds=WAIT_REFRESH_SECONDS,
        script=script,
        correlation_id=correlation_id(),
    )


def _continue_page(req: func.HttpRequest | None, redirect: str, script: str) -> str:
    """A framed redirect: the script moves on at once; without script, a link (the cookies are
    then only those the browser kept from the ``Set-Cookie`` headers)."""
    from connector_core.service.portal_web import public

    locale, _ = _locale(req)
    return public.continue_html(
        locale=locale, redirect=redirect, script=script, correlation_id=correlation_id()
    )


def _respond(
    result: LaunchResult,
    req: func.HttpRequest | None = None,
    *,
    framed: bool = False,
    wants_json: bool = False,
) -> func.HttpResponse:
    """A 302 (or the waiting page) with the cookies as ``Set-Cookie`` headers. ``framed`` (a
    frame navigation) with cookies to set: a 200 page whose nonce'd script also sets them,
    partitioned, then goes to the same redirect target; its CSP allows only that script."""
    headers = {
        "Cache-Control": _NO_STORE,
        "Referrer-Policy": "no-referrer",
        "Vary": "Sec-Fetch-Dest",
    }
    redirect = result.redirect
    if redirect is not None:
        if any(c in redirect for c in "\r\n"):  # belt and braces: never split headers
            raise ValueError("redirect target contains a line break")
        if urlsplit(redirect).scheme.lower() not in ("https", "http"):  # never javascript:
            raise ValueError("redirect target is not an http(s) URL")
    set_cookies = [_set_cookie(cookie) for cookie in result.cookies]
    if wants_json:  # the waiting page's background question
        body = json.dumps({"ready": redirect is not None, "url": redirect})
        response = func.HttpResponse(
            body, status_code=200, mimetype="application/json", charset="utf-8", headers=headers
        )
    elif framed and result.cookies:
        nonce = secrets.token_urlsafe(18)
        script = _cookie_script(result.cookies, redirect, nonce)
        page = (
            _waiting_page(req, script + "\n" + _poll_script(nonce))
            if redirect is None
            else _continue_page(req, redirect, script)
        )
        headers["Content-Security-Policy"] = f"{_LAUNCH_CSP}; script-src 'nonce-{nonce}'"
        response = func.HttpResponse(
            page, status_code=200, mimetype="text/html", charset="utf-8", headers=headers
        )
    elif redirect is not None:
        response = func.HttpResponse(status_code=302, headers={**headers, "Location": redirect})
    else:
        nonce = secrets.token_urlsafe(18)
        headers["Content-Security-Policy"] = f"{_LAUNCH_CSP}; script-src 'nonce-{nonce}'"
        response = func.HttpResponse(
            _waiting_page(req, _poll_script(nonce)),
            status_code=200,
            mimetype="text/html",
            charset="utf-8",
            headers=headers,
        )
    for set_cookie in set_cookies:
        response.headers.add("Set-Cookie", set_cookie)
    return response


def _start(req: func.HttpRequest, role: str) -> func.HttpResponse:
    from connector_core.service import launch as service

    result = service.start_launch(
        container(),
        role=service.LaunchRole(role),
        config_id=req.route_params.get("configId", ""),
        iss=req.params.get("iss"),
        launch=req.params.get("launch"),
        session_id=req.params.get("sessionId", req.params.get("conferenceId")),
        department_id=req.params.get("departmentId"),
    )
    return _respond(result, req, framed=_in_frame(req))


@bp.route(
    route="launch/provider/{configId}",
    methods=["GET"],
    auth_level=func.AuthLevel.ANONYMOUS,
)
@_frameable
@browser
def launch_provider(req: func.HttpRequest) -> func.HttpResponse:
    return _start(req, "provider")


@bp.route(
    route="launch/patient/{configId}",
    methods=["GET"],
    auth_level=func.AuthLevel.ANONYMOUS,
)
@_frameable
@browser
def launch_patient(req: func.HttpRequest) -> func.HttpResponse:
    return _start(req, "patient")


@bp.route(route="launch/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@_frameable
@browser
def launch_callback(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import launch as service

    return _respond(
        service.complete_launch(container(), query=_query(req), cookies=request_cookies(req)),
        req,
        framed=_in_frame(req),
    )


@bp.route(route="launch/sso-callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@_frameable
@browser
def launch_sso_callback(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import launch as service

    return _respond(
        service.complete_sso(container(), query=_query(req), cookies=request_cookies(req)),
        req,
        framed=_in_frame(req),
    )


@bp.route(route="launch/wait", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@_frameable
@browser
def launch_wait(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import launch as service

    result = service.poll_waiting(container(), cookies=request_cookies(req))
    wants_json = "application/json" in req.headers.get("accept", "")
    return _respond(result, req, framed=_in_frame(req), wants_json=wants_json)
