"""Usage reports (pure): a visit's participant rows -> its summary; medians and totals.

A summary is a function of the visit's stored rows (``summarize``), never a running count, so
recomputing it after any delivery, duplicate or reordered, gives the same answer. It holds keys,
roles, counts and times only: no names, no EHR ids (docs/design.md section 5, "Reports").

* ``started_at``: the first time a staff member (the clinician or other staff) and a patient or
  guest were both connected. Each participant's presence is taken as the span from their first
  connect to their last leave (what their row keeps), so a participant who left and came back
  counts as present in between;
* ``ended_at``: when the last person left, once nobody is connected;
* ``lobby_wait_seconds``: from the patient's launch (or waiting page) to their admission: the
  earliest ``lobby_at`` of the patients' rows, which holds the patient's arrival (copied there
  by the presence worker at their first admission, ``service.presence.folding``) or, when the
  connector saw no launch (a guest joined by link), their first sighting in the lobby;
* ``status``: ``in_progress`` while someone is still there, then ``completed`` when staff and a
  patient were both connected, else ``no_show``.

The report day of a visit is the UTC day its visit record was created (the first launch that
opened the meeting): it never changes, so the summary's place in storage never moves.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from connector_core.domain.models import (
    Environment,
    ParticipantRole,
    ParticipantStatus,
    Region,
    Visit,
    VisitStatus,
)
from connector_core.domain.presence import ParticipantRecord
from connector_core.domain.waiting import PATIENT_ARRIVAL_KEY

__all__ = [
    "CSV_COLUMNS",
    "DEPARTMENT_ID_MAX",
    "MAX_REPORT_DAYS",
    "ReportStatus",
    "ReportTotals",
    "TotalsBuilder",
    "VisitSummary",
    "clean_department_id",
    "summarize",
    "totals_of",
]

MAX_REPORT_DAYS = 366
DEPARTMENT_ID_MAX = 64

# The wire names, in order (JSON keys and the CSV header line).
CSV_COLUMNS = (
    "visitKey",
    "configId",
    "environment",
    "departmentId",
    "scheduledStart",
    "startedAt",
    "endedAt",
    "durationSeconds",
    "lobbyWaitSeconds",
    "attendants",
    "staffCount",
    "guestCount",
    "organizerOid",
    "status",
)


class ReportStatus(StrEnum):
    COMPLETED = "completed"
    NO_SHOW = "no_show"
    IN_PROGRESS = "in_progress"


def clean_department_id(value: str | None) -> str | None:
    """A launch URL's ``departmentId`` when it is a plain organisational id (letters, digits,
    ``.-_:``, at most 64), else None: an unfilled EHR token (``%PERFDEPID%``) or anything odd
    is left out rather than stored."""
    if not value:
        return None
    text = value.strip()
    if not text or len(text) > DEPARTMENT_ID_MAX:
        return None
    if not text[0].isascii() or not text[0].isalnum():
        return None  # nothing a spreadsheet could take for a formula (=, +, -, @)
    if not all(c.isascii() and (c.isalnum() or c in ".-_:") for c in text):
        return None
    return text


class VisitSummary(BaseModel):
    """One visit as the reports show it (stored in the reports table, one row per visit)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    visit_key: str
    region: Region
    tenant_id: str
    config_id: str
    day: date
    environment: Environment | None = None
    department_id: str | None = None
    scheduled_start: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: int | None = None
    lobby_wait_seconds: int | None = None
    attendants: int = 0
    staff_count: int = 0
    guest_count: int = 0
    organizer_oid: str | None = None
    status: ReportStatus = ReportStatus.IN_PROGRESS
    synthetic: bool = False  # written by the sandbox seeder (devtools), never by presence

    def wire(self) -> dict[str, Any]:
        """The JSON object of docs/design.md (``scheduledStart`` only when known)."""
        body: dict[str, Any] = {
            "visitKey": self.visit_key,
            "configId": self.config_id,
            "environment": self.environment.value if self.environment else None,
            "departmentId": self.department_id,
            "startedAt": _iso(self.started_at),
            "endedAt": _iso(self.ended_at),
            "durationSeconds": self.duration_seconds,
            "lobbyWaitSeconds": self.lobby_wait_seconds,
            "attendants": self.attendants,
            "staffCount": self.staff_count,
            "guestCount": self.guest_count,
            "organizerOid": self.organizer_oid,
            "status": self.status.value,
        }
        if self.scheduled_start is not None:
            body["scheduledStart"] = _iso(self.scheduled_start)
        return body

    def csv_values(self) -> tuple[str, ...]:
        """The row's values in ``CSV_COLUMNS`` order (empty for unknown)."""
        wire = self.wire()
        return tuple("" if wire.get(c) is None else str(wire[c]) for c in CSV_COLUMNS)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _seconds(later: datetime, earlier: datetime) -> int:
    return max(0, round((later - earlier).total_seconds()))


_STAFF = (ParticipantRole.CLINICIAN, ParticipantRole.STAFF)


def _span(p: ParticipantRecord) -> tuple[datetime, datetime | None] | None:
    """From first connect to last leave (None: still there); None if never connected."""
    if p.first_joined_at is None:
        return None
    if p.status is ParticipantStatus.LEFT and p.last_left_at is not None:
        return p.first_joined_at, max(p.last_left_at, p.first_joined_at)
    return p.first_joined_at, None


def _first_overlap(
    staff: Sequence[tuple[datetime, datetime | None]],
    guests: Sequence[tuple[datetime, datetime | None]],
) -> datetime | None:
    best: datetime | None = None
    for s_start, s_end in staff:
        for g_start, g_end in guests:
            start = max(s_start, g_start)
            ends = [e for e in (s_end, g_end) if e is not None]
            if ends and min(ends) <= start:
                continue  # one had left before the other came
            if best is None or start < best:
                best = start
    return best


def summarize(
    visit: Visit,
    participants: Iterable[ParticipantRecord],
    *,
    environment: Environment | None = None,
) -> VisitSummary:
    """The visit's summary from its rows (idempotent; see the module docstring)."""
    # The visit page's arrival marker is not a person of the call (domain.waiting).
    people = [p for p in participants if p.participant_key != PATIENT_ARRIVAL_KEY]
    staff = [s for p in people if p.role in _STAFF and (s := _span(p)) is not None]
    guests = [s for p in people if p.role is ParticipantRole.PATIENT and (s := _span(p))]
    started = _first_overlap(staff, guests)
    spans = [*staff, *guests]
    present = any(p.status is not ParticipantStatus.LEFT for p in people)
    over = visit.status is VisitStatus.ENDED or (bool(people) and not present)
    ended: datetime | None = None
    if spans and over and all(end is not None for _, end in spans):
        ended = max(end for _, end in spans if end is not None)
    admitted = min((start for start, _ in guests), default=None)
    lobby_wait: int | None = None
    if admitted is not None:
        seen = [
            p.lobby_at
            for p in people
            if p.role is ParticipantRole.PATIENT and p.lobby_at is not None
        ]
        waiting_from = min(seen, default=None)
        if waiting_from is not None:
            lobby_wait = _seconds(admitted, min(waiting_from, admitted))
    # Whole seconds, as the wire shows them, so durationSeconds is endedAt - startedAt exactly.
    started = started.replace(microsecond=0) if started else None
    ended = ended.replace(microsecond=0) if ended else None
    if ended is None and not over:
        status = ReportStatus.IN_PROGRESS
    elif started is not None:
        status = ReportStatus.COMPLETED
    else:
        status = ReportStatus.NO_SHOW
    return VisitSummary(
        visit_key=visit.visit_key,
        region=visit.region,
        tenant_id=visit.tenant_id,
        config_id=visit.config_id,
        day=visit.created_at.astimezone(UTC).date(),
        environment=environment,
        department_id=visit.department_id,
        started_at=started,
        ended_at=ended,
        duration_seconds=_seconds(ended, started) if started and ended else None,
        lobby_wait_seconds=lobby_wait,
        attendants=len(spans),
        staff_count=len(staff),
        guest_count=len(guests),
        organizer_oid=visit.organizer_oid,
        status=status,
    )


class ReportTotals(BaseModel):
    """The report's summary block: totals and medians."""

    model_config = ConfigDict(frozen=True)

    visits: int = 0
    completed: int = 0
    no_shows: int = 0
    median_lobby_wait_seconds: float | None = None
    median_duration_seconds: float | None = None
    total_duration_seconds: int = 0

    def wire(self) -> dict[str, Any]:
        return {
            "visits": self.visits,
            "completed": self.completed,
            "noShows": self.no_shows,
            "medianLobbyWaitSeconds": self.median_lobby_wait_seconds,
            "medianDurationSeconds": self.median_duration_seconds,
            "totalDurationSeconds": self.total_duration_seconds,
        }


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


class TotalsBuilder:
    """Totals and medians gathered one summary at a time (keeps two ints a visit, not the
    summaries, so a long report can stream past it)."""

    def __init__(self) -> None:
        self.visits = self.completed = self.no_shows = 0
        self._waits: list[int] = []
        self._durations: list[int] = []

    def add(self, summary: VisitSummary) -> None:
        self.visits += 1
        self.completed += summary.status is ReportStatus.COMPLETED
        self.no_shows += summary.status is ReportStatus.NO_SHOW
        if summary.lobby_wait_seconds is not None:
            self._waits.append(summary.lobby_wait_seconds)
        if summary.duration_seconds is not None:
            self._durations.append(summary.duration_seconds)

    def result(self) -> ReportTotals:
        return ReportTotals(
            visits=self.visits,
            completed=self.completed,
            no_shows=self.no_shows,
            median_lobby_wait_seconds=_median(self._waits),
            median_duration_seconds=_median(self._durations),
            total_duration_seconds=sum(self._durations),
        )


def totals_of(summaries: Iterable[VisitSummary]) -> ReportTotals:
    builder = TotalsBuilder()
    for summary in summaries:
        builder.add(summary)
    return builder.result()
