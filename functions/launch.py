"""Virtual visit launch (browser routes): SMART EHR launch, callbacks, the patient's waiting page.

GET /api/launch/provider/{configId}?iss&launch   GET /api/launch/patient/{configId}?iss&launch
GET /api/launch/callback?code&state (or error)   GET /api/launch/sso-callback?code&state
GET /api/launch/wait                              (the patient's waiting page polls here)

Thin: parse the request, call connector_core.service.launch, answer a 302 (Location checked by
the service), the waiting page, or (via ``@browser``) the friendly error page.
"""

from __future__ import annotations

import html

import azure.functions as func

from connector_core.bootstrap import get_container
from connector_core.logs import correlation_id
from connector_core.service.launch import (
    LaunchResult,
    LaunchRole,
    complete_launch,
    complete_sso,
    poll_waiting,
    start_launch,
)
from functions._http import browser

bp = func.Blueprint()

WAIT_REFRESH_SECONDS = 5
_NO_STORE = "no-store"


def _cookies(req: func.HttpRequest) -> dict[str, str]:
    """The request's cookies (first value wins, as browsers send the most specific first)."""
    jar: dict[str, str] = {}
    for part in req.headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in jar:
            jar[name] = value.strip().strip('"')
    return jar


def _query(req: func.HttpRequest) -> dict[str, str]:
    return {k: v for k, v in req.params.items() if isinstance(v, str)}


def _set_cookie(name: str, value: str, max_age: int) -> str:
    return f"{name}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Lax"


def _waiting_page() -> str:
    refresh = f"{WAIT_REFRESH_SECONDS};url=/api/launch/wait"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Your video visit will start soon</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{html.escape(refresh)}">
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;
color:#222}}h1{{font-size:1.4rem}}.cid{{color:#666;font-size:.85rem}}</style></head>
<body><h1>Your video visit will start soon</h1>
<p class="waiting">Your care team has not started the video visit yet. Keep this page open:
it checks every few seconds and takes you to the visit as soon as it starts.</p>
<p>You do not need an account or an app. You will wait in the lobby until you are let in.</p>
<p class="cid">Reference: <code>{html.escape(correlation_id())}</code></p>
</body></html>"""


def _respond(result: LaunchResult) -> func.HttpResponse:
    headers = {"Cache-Control": _NO_STORE, "Referrer-Policy": "no-referrer"}
    if result.redirect is not None:
        if any(c in result.redirect for c in "\r\n"):  # belt and braces: never split headers
            raise ValueError("redirect target contains a line break")
        response = func.HttpResponse(
            status_code=302, headers={**headers, "Location": result.redirect}
        )
    else:
        response = func.HttpResponse(
            _waiting_page(), status_code=200, mimetype="text/html", charset="utf-8", headers=headers
        )
    for cookie in result.cookies:
        response.headers.add("Set-Cookie", _set_cookie(cookie.name, cookie.value, cookie.max_age))
    return response


def _start(req: func.HttpRequest, role: LaunchRole) -> func.HttpResponse:
    result = start_launch(
        get_container(),
        role=role,
        config_id=req.route_params.get("configId", ""),
        iss=req.params.get("iss"),
        launch=req.params.get("launch"),
    )
    return _respond(result)


@bp.route(
    route="launch/provider/{configId}",
    methods=["GET"],
    auth_level=func.AuthLevel.ANONYMOUS,
)
@browser
def launch_provider(req: func.HttpRequest) -> func.HttpResponse:
    return _start(req, LaunchRole.PROVIDER)


@bp.route(
    route="launch/patient/{configId}",
    methods=["GET"],
    auth_level=func.AuthLevel.ANONYMOUS,
)
@browser
def launch_patient(req: func.HttpRequest) -> func.HttpResponse:
    return _start(req, LaunchRole.PATIENT)


@bp.route(route="launch/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@browser
def launch_callback(req: func.HttpRequest) -> func.HttpResponse:
    return _respond(complete_launch(get_container(), query=_query(req), cookies=_cookies(req)))


@bp.route(route="launch/sso-callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@browser
def launch_sso_callback(req: func.HttpRequest) -> func.HttpResponse:
    return _respond(complete_sso(get_container(), query=_query(req), cookies=_cookies(req)))


@bp.route(route="launch/wait", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@browser
def launch_wait(req: func.HttpRequest) -> func.HttpResponse:
    return _respond(poll_waiting(get_container(), cookies=_cookies(req)))
