"""The patient who launched but is not in the call yet (pure).

Graph reports nobody in the lobby (people waiting there are not in the call roster), so the
clinician would not learn that the patient is waiting. The patient's launch (or waiting page)
therefore records an *arrival*: one participant row of a fixed key in the visit's partition
(``p-patient-launch``), overwritten by every later arrival, so it never grows. At display time
it counts as "waiting" only while no patient row has an event after it (admitted, or left).

Reports start the lobby wait there: when the presence worker first sees a patient admitted, it
copies the arrival's time onto that patient's own row (``lobby_start``), so a later relaunch,
which overwrites the arrival row, never changes a past figure.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from connector_core.domain.models import ParticipantRole, ParticipantStatus
from connector_core.domain.presence import ParticipantRecord

__all__ = [
    "PATIENT_ARRIVAL_KEY",
    "arrival_time",
    "first_admitted",
    "lobby_start",
    "patient_arrival",
    "settle_arrival",
]

# Not a keyed hash of a Graph id (those are hex): it can never collide with a real participant.
PATIENT_ARRIVAL_KEY = "patient-launch"


def patient_arrival(at: datetime) -> ParticipantRecord:
    """The arrival row: a patient in the lobby since ``at`` (roles and times only)."""
    return ParticipantRecord(
        participant_key=PATIENT_ARRIVAL_KEY,
        role=ParticipantRole.PATIENT,
        status=ParticipantStatus.LOBBY,
        last_event_at=at,
        lobby_at=at,
    )


def settle_arrival(rows: Iterable[ParticipantRecord]) -> list[ParticipantRecord]:
    """The rows to show: the arrival row only while it still means "waiting" (in the lobby, and
    no patient joined or left after it); every other row as it is."""
    everyone = list(rows)
    arrival = next((p for p in everyone if p.participant_key == PATIENT_ARRIVAL_KEY), None)
    others = [p for p in everyone if p.participant_key != PATIENT_ARRIVAL_KEY]
    if arrival is None or arrival.status is not ParticipantStatus.LOBBY:
        return others
    since = arrival_time(arrival)
    if any(p.role is ParticipantRole.PATIENT and p.last_event_at >= since for p in others):
        return others
    return [*others, arrival]


def arrival_time(arrival: ParticipantRecord) -> datetime:
    return arrival.lobby_at or arrival.last_event_at


def first_admitted(before: ParticipantRecord | None, after: ParticipantRecord) -> bool:
    """Whether ``after`` is a patient row whose first admission this change records (new, or
    earlier than the one stored: a reordered delivery)."""
    if after.role is not ParticipantRole.PATIENT or after.first_joined_at is None:
        return False
    if after.participant_key == PATIENT_ARRIVAL_KEY:
        return False
    known = before.first_joined_at if before is not None else None
    return known is None or after.first_joined_at < known


def lobby_start(row: ParticipantRecord, arrival: ParticipantRecord | None) -> ParticipantRecord:
    """The patient's row with its lobby start taken back to the arrival, when the arrival came
    no later than their first admission (a later one is a relaunch, for a later session). The
    earliest time wins, so applying it again, or in any order, gives the same row."""
    if arrival is None or row.first_joined_at is None:
        return row
    since = arrival_time(arrival)
    if since > row.first_joined_at:
        return row
    if row.lobby_at is not None and row.lobby_at <= since:
        return row
    return row.model_copy(update={"lobby_at": since})
