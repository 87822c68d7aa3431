"""The clinician's live view: ``GET /api/visits/{visitKey}/participants``.

JSON by default; HTML (a small page that refreshes itself) with ``?format=html`` or when the
browser asks for ``text/html``. Only the visit's clinician: an Entra access token
(``Authorization: Bearer``) whose ``oid`` is the meeting organizer's, or the ``__Host-vv-visit``
cookie the provider launch sets.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

import azure.functions as func

from connector_core.errors import AuthenticationError, NotFoundError
from functions._http import api, browser, container, json_response

if TYPE_CHECKING:
    from connector_core.domain.models import Visit

bp = func.Blueprint()

_VISIT_KEY = re.compile(r"^[0-9a-f]{16,64}$")
REFRESH_SECONDS = 5
_ROLE_LABELS = {"clinician": "Clinician (you)", "patient": "Patient / guest", "staff": "Staff"}


def _cookie(req: func.HttpRequest, name: str) -> str | None:
    for part in str(req.headers.get("cookie", "")).split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


def _bearer(req: func.HttpRequest) -> str | None:
    scheme, _, value = str(req.headers.get("authorization", "")).partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _authorized_visit(req: func.HttpRequest) -> Visit:
    from connector_core.service.presence import VISIT_COOKIE, authorize_viewer

    root = container()
    visit_key = req.route_params.get("visitKey", "").lower()
    bearer, cookie = _bearer(req), _cookie(req, VISIT_COOKIE)
    if not bearer and not cookie:  # before any lookup: no probing which visits exist
        raise AuthenticationError(
            "Open the visit from the EHR first (or send an Entra access token).",
            action="Start the virtual visit from the EHR; this page then shows who has joined.",
        )
    if not _VISIT_KEY.match(visit_key):
        raise NotFoundError("No such visit.")
    visit = root.visits.get(visit_key).record
    authorize_viewer(root, visit, bearer=bearer, visit_cookie=cookie)
    return visit


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
