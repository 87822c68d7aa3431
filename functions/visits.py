"""The clinician's visit page and live view (docs/visit-page.md).

GET /api/visits/{visitKey}                 the visit page (HTML): opens the meeting, who is here
GET /api/visits/{visitKey}/events          its event stream (text/event-stream, bounded; see below)
GET /api/visits/{visitKey}/participants    the live view: JSON by default; HTML (a small page that
                                           refreshes itself) with ``?format=html`` or ``Accept``

Only the visit's clinician: an Entra access token (``Authorization: Bearer``) whose ``oid`` is
the meeting organizer's (same tenant), or the ``__Host-vv-visit`` cookie the provider launch
sets. Errors: the friendly HTML page for the visit page, problem+json for the others.

The event stream is the "equivalent" of server-sent events that a Functions HTTP response can
carry (a whole body, no streaming): it answers as soon as the view differs from the
``Last-Event-ID`` the browser sends (or after ``STREAM_SECONDS`` with a comment), with
``retry:`` set, and the browser's EventSource reconnects. It is an async function that sleeps
between reads, so a waiting stream holds no worker thread.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import secrets
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import azure.functions as func

from connector_core.errors import ConnectorError
from connector_core.logs import use_correlation_id
from functions._http import (
    api,
    browser,
    container,
    inline_script,
    json_response,
    page_response,
    problem_response,
    request_cookies,
    request_correlation_id,
)

if TYPE_CHECKING:
    from connector_core.domain.models import Visit

bp = func.Blueprint()

_EVENT_ID = re.compile(r"^[0-9a-f]{16}$")
REFRESH_SECONDS = 5
_ROLE_LABELS = {"clinician": "Clinician (you)", "patient": "Patient / guest", "staff": "Staff"}


def _bearer(req: func.HttpRequest) -> str | None:
    scheme, _, value = str(req.headers.get("authorization", "")).partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _authorized_visit(req: func.HttpRequest) -> Visit:
    from connector_core.service.visit_cookie import VISIT_COOKIE
    from connector_core.service.visit_page import authorized_visit

    return authorized_visit(
        container(),
        req.route_params.get("visitKey", ""),
        bearer=_bearer(req),
        visit_cookie=request_cookies(req).get(VISIT_COOKIE) or None,
    )


def _wants_html(req: func.HttpRequest) -> bool:
    fmt = (req.params.get("format") or "").lower()
    if fmt:
        return fmt == "html"
    accept = req.headers.get("accept", "").lower()
    return "text/html" in accept and "application/json" not in accept


@api
def _json_view(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service.presence import participants_view

    view = participants_view(container(), _authorized_visit(req))
    return json_response(view, headers={"Cache-Control": "no-store"})


def _since(value: Any) -> str:
    if not isinstance(value, str):
        return "-"
    return datetime.fromisoformat(value).strftime("%H:%M:%S UTC")


def _page(view: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr class="participant" data-role="{html.escape(p["role"])}" '
        f'data-status="{html.escape(p["status"])}">'
        f"<td>{html.escape(_ROLE_LABELS.get(p['role'], p['role']))}</td>"
        f"<td>{html.escape(p['status'])}</td>"
        f"<td>{html.escape(_since(p['joinedAt']))}</td>"
        f"<td>{html.escape(_since(p['leftAt']))}</td></tr>"
        for p in view["participants"]
    )
    if not rows:
        rows = '<tr><td colspan="4" class="empty">Nobody has joined yet.</td></tr>'
    lobby = (
        '<p class="lobby" role="status">The patient is waiting in the lobby: admit them in '
        "Teams.</p>"
        if view["patientWaitingInLobby"]
        else ""
    )
    connected = len(view["connected"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Virtual visit: who is connected</title>
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;
color:#222}}table{{border-collapse:collapse;width:100%}}td,th{{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #ddd}}.lobby{{background:#fff4ce;padding:.5rem}}.muted{{color:#666}}</style>
</head><body><h1>Who is connected</h1>
<p class="summary" data-connected="{connected}" data-call="{html.escape(view["callStatus"])}">
{connected} connected now; call {html.escape(view["callStatus"])}.</p>{lobby}
<table><thead><tr><th>Role</th><th>Status</th><th>Joined</th><th>Left</th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="muted">Refreshes every {REFRESH_SECONDS} seconds. Roles and times only.</p>
</body></html>"""


@browser
def _html_view(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service.presence import participants_view

    view = participants_view(container(), _authorized_visit(req))
    return func.HttpResponse(
        _page(view),
        status_code=200,
        mimetype="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        },
    )


@bp.route(
    route="visits/{visitKey}/participants", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS
)
def visit_participants(req: func.HttpRequest) -> func.HttpResponse:
    return _html_view(req) if _wants_html(req) else _json_view(req)


# --- the visit page -----------------------------------------------------------------------------

# The page runs its one nonce'd script; it may show inside the EHR's frame (nothing on it acts
# without the clinician's click but opening their own meeting).
_PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors *; script-src 'nonce-{nonce}'"
)


@bp.route(route="visits/{visitKey}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@browser
def visit_page(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.logs import correlation_id
    from connector_core.service import visit_page as service
    from connector_core.service.portal_web import public
    from connector_core.service.portal_web.visit_pages import visit_page_html

    root = container()
    visit = _authorized_visit(req)
    view = service.live_view(root, visit)
    join = visit.join_web_url or ""
    locale, _ = public.locale_for(req.headers, req.params)
    nonce = secrets.token_urlsafe(18)
    base = f"/api/visits/{visit.visit_key}"
    page = visit_page_html(
        locale=locale,
        view=view,
        version=service.view_version(view),
        app_link=service.teams_app_link(join) if join else "",
        web_link=join,
        events_url=f"{base}/events",
        poll_url=f"{base}/participants",
        script=inline_script("visit_page.js", nonce),
        correlation_id=correlation_id(),
        page_url=base,
    )
    return page_response(page, locale=locale, csp=_PAGE_CSP.format(nonce=nonce))


def _event(view: dict[str, Any], version: str) -> str:
    return f"id: {version}\nevent: view\ndata: {json.dumps(view, separators=(',', ':'))}\n\n"


@bp.route(route="visits/{visitKey}/events", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def visit_events(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import visit_page as service

    cid = request_correlation_id(req)
    with use_correlation_id(cid):
        try:
            root = container()
            visit = await asyncio.to_thread(_authorized_visit, req)
            last = req.headers.get("last-event-id", "").strip().lower()
            if not _EVENT_ID.match(last):
                last = ""
            deadline = time.monotonic() + service.STREAM_SECONDS
            body = ""
            view = await asyncio.to_thread(service.live_view, root, visit)
            while True:
                version = service.view_version(view)
                if version != last:
                    body = _event(view, version)
                    break
                if time.monotonic() + service.STREAM_POLL_SECONDS > deadline:
                    body = ": no change\n\n"
                    break
                await asyncio.sleep(service.STREAM_POLL_SECONDS)
                # The call's status lives on the visit row: one query reads it with the rows.
                view = await asyncio.to_thread(service.fresh_view, root, visit.visit_key)
        except ConnectorError as error:  # EventSource stops on a non-200: the page then polls
            return problem_response(error, cid)
        except Exception:  # a bug: problem+json with the correlation id, never a traceback
            import logging

            logging.getLogger("connector.http").exception("request.crashed route=visit_events")
            return problem_response(
                ConnectorError("An unexpected error occurred; quote the correlation id."), cid
            )
        return func.HttpResponse(
            f"retry: {service.STREAM_RETRY_MS}\n" + body,
            status_code=200,
            mimetype="text/event-stream",
            charset="utf-8",
            headers={
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
                "x-correlation-id": cid,
            },
        )
