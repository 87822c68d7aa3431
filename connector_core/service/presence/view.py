"""The clinician's live view: who is connected now and since when (roles and times only).

It reads the visit's participant rows (one query of the ``p-`` rows of its partition).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from connector_core.domain.models import ParticipantRole, ParticipantStatus, Visit
from connector_core.domain.presence import ParticipantRecord, sort_participants
from connector_core.domain.waiting import settle_arrival
from connector_core.errors import AuthenticationError, PermissionDeniedError
from connector_core.service.visit_cookie import VISIT_COOKIE

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = ["VISIT_COOKIE", "authorize_viewer", "check_organizer", "participants_view"]


def authorize_viewer(
    container: Container, visit: Visit, *, bearer: str | None, visit_cookie: str | None
) -> None:
    """Only the visit's clinician: an Entra access token whose ``oid`` is the organizer's, or
    the visit cookie the provider launch set. ``AuthenticationError``/``PermissionDeniedError``."""
    if bearer:
        check_organizer(visit, container.portal_tokens.validate(bearer))
        return
    if visit_cookie:
        # The browser's recent visits, each until its own expiry (service/visit_cookie.py).
        from connector_core.service.visit_cookie import cookie_visits

        if any(key == visit.visit_key for key, _ in cookie_visits(container.keyring, visit_cookie)):
            return
        raise PermissionDeniedError("Only the visit's clinician can see who is connected.")
    raise AuthenticationError(
        "Sign in: open the visit from the EHR, or send an Entra access token.",
        action="Open the virtual visit from the EHR again.",
    )


def check_organizer(visit: Visit, claims: dict[str, Any]) -> None:
    """A validated Entra token's claims name the visit's organizer (``PermissionDeniedError``)."""
    oid = str(claims.get("oid", "")).lower()
    tid = str(claims.get("tid", "")).lower()
    if (
        not visit.organizer_oid
        or oid != visit.organizer_oid.lower()
        or tid != visit.tenant_id.lower()  # an Entra user is its tid + oid, never oid alone
    ):
        raise PermissionDeniedError("Only the visit's clinician can see who is connected.")


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def participants_view(
    container: Container, visit: Visit, *, rows: list[ParticipantRecord] | None = None
) -> dict[str, Any]:
    """Who is connected now and since when (roles and times only), from the participant rows
    (read here unless the caller read them with the visit)."""
    found = container.visits.participants(visit) if rows is None else rows
    # The patient's launch counts as waiting (Graph reports nobody in the lobby): waiting.py.
    shown = sort_participants(settle_arrival(found))
    participants = [
        {
            "participant": p.participant_key[:12],
            "role": p.role.value,
            "status": p.status.value,
            "joinedAt": _time(p.joined_at),
            "leftAt": _time(p.left_at),
            "firstJoinedAt": _time(p.first_joined_at),
            "lobbySince": _time(p.lobby_at) if p.status is ParticipantStatus.LOBBY else None,
        }
        for p in shown
    ]
    connected = [p for p in participants if p["status"] == ParticipantStatus.CONNECTED.value]
    waiting = any(
        p.role is ParticipantRole.PATIENT and p.status is ParticipantStatus.LOBBY for p in shown
    )
    return {
        "visitKey": visit.visit_key,
        "callStatus": visit.status.value,
        "connected": connected,
        "participants": participants,
        "patientWaitingInLobby": waiting,
        "updatedAt": _time(max([visit.updated_at, *(p.last_event_at for p in shown)])),
    }
