"""The clinician's visit page: where the provider launch lands (docs/visit-page.md).

The page opens the meeting (Teams app or browser) and shows who is connected, who is waiting
and who left, kept current by a bounded event stream (``visit_events``) with polling of the
participants JSON as fallback. Authorization is the live view's (``authorize_viewer``): the
visit cookie the provider launch set, or an Entra token of the organizer (same tenant). Roles
and times only: Graph offers no roster with names to an application outside the call, so the
page names roles ("Clinician (you)", "Patient", "Staff"), and nothing about people is stored.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from connector_core.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from connector_core.service.visit_cookie import VISIT_KEY, cookie_visits

if TYPE_CHECKING:
    from connector_core.bootstrap import Container
    from connector_core.domain.models import Visit

__all__ = [
    "STREAM_POLL_SECONDS",
    "STREAM_RETRY_MS",
    "STREAM_SECONDS",
    "authorized_visit",
    "fresh_view",
    "live_view",
    "teams_app_link",
    "view_version",
]

# The event stream answers within STREAM_SECONDS (at once when something changed), then the
# browser's EventSource reconnects after STREAM_RETRY_MS: no request is held open for long,
# and a change shows within STREAM_POLL_SECONDS + STREAM_RETRY_MS (under 2 s).
STREAM_SECONDS = 25.0
STREAM_POLL_SECONDS = 1.0
STREAM_RETRY_MS = 500


def authorized_visit(
    container: Container, visit_key: str, *, bearer: str | None, visit_cookie: str | None
) -> Visit:
    """The visit, for its clinician only (``AuthenticationError``/``PermissionDeniedError``);
    a caller without a genuine credential for it learns nothing about which visits exist and
    costs no table read (the visit page's stream is anonymous-reachable and reconnects)."""
    from connector_core.service.presence.view import check_organizer

    if not bearer and not visit_cookie:
        raise AuthenticationError(
            "Open the visit from the EHR first (or send an Entra access token).",
            action="Start the virtual visit from the EHR; this page then shows who has joined.",
        )
    key = visit_key.lower()
    if not VISIT_KEY.match(key):
        raise NotFoundError("No such visit.")
    claims = None
    if bearer:
        claims = container.portal_tokens.validate(bearer)  # genuine first; the organizer below
    elif visit_cookie and all(k != key for k, _ in cookie_visits(container.keyring, visit_cookie)):
        # The cookie is the whole check (authorize_viewer's cookie branch): none for a bearer.
        raise PermissionDeniedError("Only the visit's clinician can see who is connected.")
    visit = container.visits.get(key).record
    if claims is not None:
        check_organizer(visit, claims)
    return visit


def live_view(container: Container, visit: Visit) -> dict[str, Any]:
    """The participants view (roles and times) the page and its stream show."""
    from connector_core.service.presence import participants_view

    return participants_view(container, visit)


def fresh_view(container: Container, visit_key: str) -> dict[str, Any]:
    """The view as it is now: the visit row (the call's status) and its participant rows, read
    in one query (the stream checks every ``STREAM_POLL_SECONDS`` while the page is open)."""
    from connector_core.service.presence import participants_view

    visit, rows = container.visits.with_participants(visit_key)
    return participants_view(container, visit, rows=rows)


def view_version(view: dict[str, Any]) -> str:
    """A short fingerprint of what the page shows (the stream's event id)."""
    shown = {k: v for k, v in view.items() if k != "updatedAt"}
    digest = hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def teams_app_link(join_web_url: str) -> str:
    """The Teams app's deep link for a join URL: the same path and query, ``msteams:`` scheme
    (Teams documents ``msteams:/l/meetup-join/...`` as what its https links open)."""
    parts = urlsplit(join_web_url)
    return urlunsplit(("msteams", "", parts.path or "/", parts.query, ""))
