"""Presence rules (pure): Graph meeting call events -> participant state and write-back transitions.

Graph delivers meeting call events at least once and may reorder them. The rules here make
processing idempotent and order-independent:

* A call event is reduced at the webhook to a :class:`CallEvent` that carries no names: each
  roster entry keeps a keyed hash of Graph's participant id, the kind of identity (user, guest,
  ACS user, phone) and, for Entra users, a keyed hash of the user's object id (so the queue side
  can recognise the organizer without ever seeing a raw id of a staff member).
* Participant state (:func:`apply_event`) keeps, per participant, the time of the last event that
  changed it; an event is applied only when it is newer (``eventDateTime``). A stale join that
  belongs *before* a later leave still fills in that participant's ``joined_at``.
* Write-back transitions (:func:`transitions_of`) depend on the event alone, not on state: every
  non-lobby entry of ``activeParticipants@joined`` is a *connect*, every entry of
  ``activeParticipants@exited`` a *disconnect*, at the event's time. Their key
  (:func:`writeback_key`) identifies the write-back, so a duplicate delivery maps to the same
  key and is written once.
  ``CallEnded`` closes the remaining connections in the live view but writes nothing back: Graph
  reports every departure in a roster update, and writing it twice would duplicate records.

Storage (``connector_core.repositories``): each participant is a row of its own in the visit's
partition (:class:`ParticipantRecord`), and so is each write-back (:class:`WritebackRecord`), so
nothing grows with the number of participants, events or write-backs, and a visit's state
change and its ledger entries commit in one entity-group transaction. Besides the current
session (status, since when), a participant row keeps order-independent facts for reports: the
first time connected, the last time left and the first time seen in the lobby (each a min or a
max over events, so duplicates and reordering give the same values). Visit-level times are
derivable: ``CallStarted``/``CallEnded`` on the visit row; when clinician and patient were first
both connected, from the ledger rows (every connect/disconnect with its role and time).

Identity sets in meeting call events are PascalCase (``Identity.User.Id``, ``Guest``,
``AzureCommunicationServicesUser``) where other Graph payloads are camelCase: keys are read
case-insensitively everywhere.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from connector_core.domain.models import (
    ParticipantRole,
    ParticipantState,
    ParticipantStatus,
    Region,
    Visit,
    VisitStatus,
)
from connector_core.errors import InvalidInputError

__all__ = [
    "ENDED_GRACE",
    "MAX_UNSTARTED_AGE",
    "CallEvent",
    "CallEventKind",
    "IdentityKind",
    "ParticipantRecord",
    "RosterEntry",
    "Transition",
    "TransitionKind",
    "WritebackOutcome",
    "WritebackRecord",
    "WritebackStatus",
    "apply_event",
    "apply_to_visit",
    "call_ended_at",
    "changed_participants",
    "ci_get",
    "from_legacy",
    "parse_call_event",
    "parse_graph_time",
    "role_of",
    "sort_participants",
    "transitions_of",
    "visit_is_live",
    "writeback_key",
]

# A visit stays "live" (subscription kept, renewed, recreated) this long after its call ended,
# so a clinician who drops and rejoins keeps presence; and an unstarted visit this long.
ENDED_GRACE = timedelta(minutes=30)
MAX_UNSTARTED_AGE = timedelta(hours=24)


class CallEventKind(StrEnum):
    CALL_STARTED = "call_started"
    CALL_ENDED = "call_ended"
    ROSTER = "roster"


class IdentityKind(StrEnum):
    USER = "user"  # an Entra user: the organizer (clinician) or other staff
    GUEST = "guest"  # anonymous browser guest (the patient's way in)
    ACS = "acs"  # Azure Communication Services identity (patient apps)
    PHONE = "phone"  # dial-in


class TransitionKind(StrEnum):
    CONNECT = "connect"
    DISCONNECT = "disconnect"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class RosterEntry(_Frozen):
    """One participant of a roster update: keys only, never a display name."""

    participant_key: str
    kind: IdentityKind
    user_key: str | None = None  # keyed hash of an Entra user's object id
    in_lobby: bool = False


class CallEvent(_Frozen):
    """A meeting call event reduced to what presence needs (no names, no raw ids)."""

    kind: CallEventKind
    at: datetime
    joined: tuple[RosterEntry, ...] = ()
    exited: tuple[RosterEntry, ...] = ()


class Transition(_Frozen):
    """A connect or disconnect to write back to the EHR."""

    participant_key: str
    role: ParticipantRole
    kind: TransitionKind
    at: datetime


class WritebackStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    DROPPED = "dropped"  # never to be written (the visit's configuration was deleted)


class WritebackOutcome(StrEnum):
    """How the EHR confirmed a write-back."""

    CREATED = "created"  # 201: the EHR stored it now
    EXISTED = "existed"  # 200 (or 412) to the conditional create: stored by an earlier attempt
    RECONCILED = "reconciled"  # found by searching its identifier before a retry


class WritebackRecord(_Frozen):
    """The write-back ledger: one row per (visit, participant, transition, event time), in the
    visit's partition (row ``w-{key}``).

    Claimed in the same transaction that folds the event into the visit's state, before the EHR
    is called, so a duplicate delivery finds it. A lease (``lease_id``/``lease_until``) lets one
    worker at a time call the EHR, and the worker posts only while its lease has time left for
    the whole call (``lease_covers``); the final update is fenced by the row's ETag.
    ``audit_done``/``epic_done`` record each call that succeeded, so a retry repeats only what
    failed; ``maybe_sent`` marks an attempt whose outcome is unknown (a timeout, a 5xx, a lost
    worker), which makes the next attempt search the EHR for it first. Keys, roles and times.
    """

    key: str
    visit_key: str
    region: Region
    participant_key: str
    role: ParticipantRole
    transition: TransitionKind
    at: datetime
    status: WritebackStatus = WritebackStatus.PENDING
    audit_done: bool = False
    epic_done: bool = False
    attempts: int = 0
    maybe_sent: bool = False
    outcome: WritebackOutcome | None = None
    lease_id: str | None = None
    lease_until: datetime | None = None
    last_error: str | None = None
    created_at: datetime
    updated_at: datetime
    done_at: datetime | None = None

    def leased_by_other(self, lease_id: str, *, now: datetime) -> bool:
        return (
            self.lease_id is not None
            and self.lease_id != lease_id
            and self.lease_until is not None
            and self.lease_until > now
        )

    def lease_covers(self, lease_id: str, *, now: datetime, seconds: float) -> bool:
        """Whether ``lease_id`` holds this row for at least ``seconds`` more (a call that
        could outlast the lease must not start: another worker may take over meanwhile)."""
        return (
            self.lease_id == lease_id
            and self.lease_until is not None
            and self.lease_until - now >= timedelta(seconds=seconds)
        )

    @property
    def finished(self) -> bool:
        return self.status is not WritebackStatus.PENDING


class ParticipantRecord(ParticipantState):
    """One participant of a visit, stored in a row of its own (``p-{participant_key}`` in the
    visit's partition). The current session (``status``, ``joined_at``, ``left_at``,
    ``last_event_at``, from :class:`ParticipantState`) plus facts for reports that any delivery
    order gives alike: ``first_joined_at`` (earliest connect), ``last_left_at`` (latest exit),
    ``lobby_at`` (earliest sighting in the lobby). Roles and times only."""

    first_joined_at: datetime | None = None
    last_left_at: datetime | None = None
    lobby_at: datetime | None = None

    @property
    def lobby_seconds(self) -> float | None:
        """Time from the first lobby sighting to the first connect (admission), when seen."""
        if self.lobby_at is None or self.first_joined_at is None:
            return None
        return max(0.0, (self.first_joined_at - self.lobby_at).total_seconds())


def from_legacy(state: ParticipantState) -> ParticipantRecord:
    """A participant kept in a visit record written before participants had rows."""
    return ParticipantRecord(
        **state.model_dump(),
        first_joined_at=state.joined_at,
        last_left_at=state.left_at,
    )


# --- parsing ----------------------------------------------------------------------------------

_FRACTION = re.compile(r"^(?P<main>.*T\d\d:\d\d:\d\d)(?P<frac>\.\d+)?(?P<zone>.*)$")


def parse_graph_time(value: Any) -> datetime:
    """Graph's ISO times (up to 7 fractional digits, ``Z``) as aware UTC datetimes."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError("The event has no eventDateTime.")
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    match = _FRACTION.match(text)
    if match and match.group("frac"):
        # Python parses at most 6 fractional digits; Graph sends 7 (100 ns ticks).
        text = f"{match.group('main')}.{match.group('frac')[1:7]}{match.group('zone')}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError("The event's eventDateTime is not an ISO 8601 time.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def ci_get(mapping: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present in ``mapping``, keys compared ignoring case."""
    if not isinstance(mapping, Mapping):
        return None
    lowered = {str(k).lower(): v for k, v in mapping.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value is not None:
            return value
    return None


_EVENT_KINDS = {
    "callstarted": CallEventKind.CALL_STARTED,
    "callended": CallEventKind.CALL_ENDED,
    "callrosterupdate": CallEventKind.ROSTER,
}


def _event_kind(value: Any) -> CallEventKind:
    if not isinstance(value, str):
        raise InvalidInputError("The event has no eventType.")
    name = value.rsplit(".", 1)[-1].strip().lower()
    kind = _EVENT_KINDS.get(name)
    if kind is None:
        raise InvalidInputError("The event type is not a meeting call event.")
    return kind


def _entry(
    raw: Any,
    *,
    participant_key: Callable[[str], str],
    user_key: Callable[[str], str],
) -> RosterEntry | None:
    """A roster entry, or None for identities that are not people (bots, applications)."""
    if not isinstance(raw, Mapping):
        raise InvalidInputError("A roster entry is not an object.")
    identity = ci_get(raw, "identity")
    if not isinstance(identity, Mapping):
        raise InvalidInputError("A roster entry has no identity.")
    participant_id = ci_get(raw, "id")
    kind: IdentityKind | None = None
    oid: str | None = None
    # Most specific first: a guest or ACS identity may carry a "user" shape as well.
    for names, candidate in (
        (("guest",), IdentityKind.GUEST),
        (("azureCommunicationServicesUser", "acsUser"), IdentityKind.ACS),
        (("phone",), IdentityKind.PHONE),
        (("user",), IdentityKind.USER),
    ):
        shape = ci_get(identity, *names)
        if isinstance(shape, Mapping):
            kind = candidate
            inner_id = ci_get(shape, "id")
            if candidate is IdentityKind.USER:
                if not isinstance(inner_id, str) or not inner_id:
                    raise InvalidInputError("A user roster entry has no user id.")
                oid = inner_id
            if not participant_id and isinstance(inner_id, str):
                participant_id = inner_id
            break
    if kind is None:
        return None  # application / device / encrypted identities: not a visit participant
    if not isinstance(participant_id, str) or not participant_id:
        raise InvalidInputError("A roster entry has no participant id.")
    lobby = ci_get(raw, "isInLobby")
    return RosterEntry(
        participant_key=participant_key(participant_id),
        kind=kind,
        user_key=user_key(oid.lower()) if oid else None,
        in_lobby=lobby is True or (isinstance(lobby, str) and lobby.lower() == "true"),
    )


def _entries(
    value: Any, *, participant_key: Callable[[str], str], user_key: Callable[[str], str]
) -> tuple[RosterEntry, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidInputError("A roster list is not an array.")
    found = (_entry(raw, participant_key=participant_key, user_key=user_key) for raw in value)
    return tuple(e for e in found if e is not None)


def parse_call_event(
    resource: Mapping[str, Any],
    *,
    participant_key: Callable[[str], str],
    user_key: Callable[[str], str],
) -> CallEvent:
    """Reduce a decrypted (or plain ``resourceData``) meeting call event. ``participant_key``
    and ``user_key`` hash Graph's participant id and an Entra object id. Raises
    ``InvalidInputError`` when it is not a well-formed meeting call event."""
    if not isinstance(resource, Mapping):
        raise InvalidInputError("The notification's resource is not an object.")
    kind = _event_kind(ci_get(resource, "eventType"))
    at = parse_graph_time(ci_get(resource, "eventDateTime"))
    joined: tuple[RosterEntry, ...] = ()
    exited: tuple[RosterEntry, ...] = ()
    if kind is CallEventKind.ROSTER:
        joined = _entries(
            ci_get(resource, "activeParticipants@joined"),
            participant_key=participant_key,
            user_key=user_key,
        )
        exited = _entries(
            ci_get(resource, "activeParticipants@exited"),
            participant_key=participant_key,
            user_key=user_key,
        )
    return CallEvent(kind=kind, at=at, joined=joined, exited=exited)


# --- rules ------------------------------------------------------------------------------------


def role_of(entry: RosterEntry, *, clinician_user_key: str | None) -> ParticipantRole:
    """The organizer is the clinician; guests, ACS users and callers are the patient (or their
    companions); any other Entra user is staff."""
    if entry.kind is IdentityKind.USER:
        if clinician_user_key is not None and entry.user_key == clinician_user_key:
            return ParticipantRole.CLINICIAN
        return ParticipantRole.STAFF
    return ParticipantRole.PATIENT


def transitions_of(event: CallEvent, *, clinician_user_key: str | None) -> list[Transition]:
    """The write-backs an event asks for (a function of the event alone; see the module doc)."""
    result: list[Transition] = []
    for entry in event.joined:
        if not entry.in_lobby:
            result.append(
                Transition(
                    participant_key=entry.participant_key,
                    role=role_of(entry, clinician_user_key=clinician_user_key),
                    kind=TransitionKind.CONNECT,
                    at=event.at,
                )
            )
    for entry in event.exited:
        result.append(
            Transition(
                participant_key=entry.participant_key,
                role=role_of(entry, clinician_user_key=clinician_user_key),
                kind=TransitionKind.DISCONNECT,
                at=event.at,
            )
        )
    return result


def writeback_key(visit_key: str, transition: Transition) -> str:
    """Stable id of one write-back: the same for every delivery of the same event."""
    text = "|".join(
        (
            visit_key,
            transition.participant_key,
            transition.kind.value,
            transition.at.astimezone(UTC).isoformat(timespec="microseconds"),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _earliest(current: datetime | None, at: datetime) -> datetime:
    return at if current is None or at < current else current


def _latest(current: datetime | None, at: datetime) -> datetime:
    return at if current is None or at > current else current


def _apply_entry(
    current: ParticipantRecord | None,
    entry: RosterEntry,
    *,
    joined: bool,
    at: datetime,
    role: ParticipantRole,
    call_ended_at: datetime | None = None,
) -> ParticipantRecord | None:
    """The participant's new row, or None when the event changes nothing."""
    if joined:
        status = ParticipantStatus.LOBBY if entry.in_lobby else ParticipantStatus.CONNECTED
    else:
        status = ParticipantStatus.LEFT
    facts: dict[str, Any] = {}
    if status is ParticipantStatus.CONNECTED:
        facts["first_joined_at"] = _earliest(current.first_joined_at if current else None, at)
    elif status is ParticipantStatus.LEFT:
        facts["last_left_at"] = _latest(current.last_left_at if current else None, at)
    else:
        facts["lobby_at"] = _earliest(current.lobby_at if current else None, at)
    if current is None:
        updated = ParticipantRecord(
            participant_key=entry.participant_key,
            role=role,
            status=status,
            joined_at=at if status is ParticipantStatus.CONNECTED else None,
            left_at=at if status is ParticipantStatus.LEFT else None,
            last_event_at=at,
            **facts,
        )
    elif at > current.last_event_at:
        if status is ParticipantStatus.CONNECTED:
            # Connected since the latest join (a leave between two joins may still be on its
            # way; Graph never reports the same join twice with different times).
            session: dict[str, Any] = {"joined_at": at, "left_at": None}
        elif status is ParticipantStatus.LEFT:
            session = {"left_at": at}
        else:
            session = {"left_at": None}
        updated = current.model_copy(
            update={"role": role, "status": status, "last_event_at": at, **session, **facts}
        )
    elif (
        status is ParticipantStatus.CONNECTED
        and current.status is ParticipantStatus.LEFT
        and (current.left_at is None or at <= current.left_at)
        and (current.joined_at is None or at > current.joined_at)
    ):
        # A join that arrived after its leave: it tells us since when they were connected.
        updated = current.model_copy(update={"joined_at": at, **facts})
    else:
        # Stale for the session (already applied, or superseded), yet it may still be the
        # earliest connect or the latest exit seen.
        updated = current.model_copy(update=facts)
    if (
        call_ended_at is not None
        and updated.status is not ParticipantStatus.LEFT
        and updated.last_event_at <= call_ended_at
    ):
        # The call ended after this (late) join: nobody is still connected to an ended call.
        updated = updated.model_copy(
            update={
                "status": ParticipantStatus.LEFT,
                "left_at": call_ended_at,
                "last_event_at": call_ended_at,
                "last_left_at": _latest(updated.last_left_at, call_ended_at),
            }
        )
    return None if updated == current else updated


def changed_participants(
    participants: Mapping[str, ParticipantRecord],
    event: CallEvent,
    *,
    clinician_user_key: str | None,
    call_ended_at: datetime | None = None,
) -> dict[str, ParticipantRecord]:
    """The participant rows ``event`` changes (by participant key), given the current rows of
    the participants it names (and, for ``CallEnded``, of everyone). ``call_ended_at``: the
    visit's call ended then (a join older than that arrives late: closed at once)."""
    changed: dict[str, ParticipantRecord] = {}

    def current(key: str) -> ParticipantRecord | None:
        return changed.get(key) or participants.get(key)

    if event.kind is CallEventKind.CALL_ENDED:
        for key, state in participants.items():
            if state.status is not ParticipantStatus.LEFT and event.at > state.last_event_at:
                changed[key] = state.model_copy(
                    update={
                        "status": ParticipantStatus.LEFT,
                        "left_at": event.at,
                        "last_event_at": event.at,
                        "last_left_at": _latest(state.last_left_at, event.at),
                    }
                )
    for entries, joined in ((event.joined, True), (event.exited, False)):
        for entry in entries:
            role = role_of(entry, clinician_user_key=clinician_user_key)
            updated = _apply_entry(
                current(entry.participant_key),
                entry,
                joined=joined,
                at=event.at,
                role=role,
                call_ended_at=call_ended_at,
            )
            if updated is not None:
                changed[entry.participant_key] = updated
    return changed


_ROLE_ORDER = {ParticipantRole.CLINICIAN: 0, ParticipantRole.PATIENT: 1, ParticipantRole.STAFF: 2}


def sort_participants(participants: Iterable[ParticipantRecord]) -> tuple[ParticipantRecord, ...]:
    """Clinician first, then patients, then staff; each by their last event."""
    return tuple(
        sorted(
            participants,
            key=lambda p: (_ROLE_ORDER[p.role], p.last_event_at, p.participant_key),
        )
    )


def apply_event(
    participants: Iterable[ParticipantRecord],
    event: CallEvent,
    *,
    clinician_user_key: str | None,
) -> tuple[ParticipantRecord, ...]:
    """Every participant after ``event`` (idempotent, order-independent by event time)."""
    by_key = {p.participant_key: p for p in participants}
    by_key.update(changed_participants(by_key, event, clinician_user_key=clinician_user_key))
    return sort_participants(by_key.values())


def apply_to_visit(visit: Visit, event: CallEvent, *, now: datetime) -> Visit:
    """The visit's call status after ``event`` (live or ended, by event time:
    ``Visit.call_event_at`` remembers the latest call-level event applied). Participants live in
    rows of their own (:func:`changed_participants`)."""
    last = visit.call_event_at
    newer = last is None or event.at > last
    update: dict[str, Any] = {}
    if event.kind is CallEventKind.CALL_ENDED and newer:
        update.update(status=VisitStatus.ENDED, ended_at=event.at, call_event_at=event.at)
    elif event.kind is CallEventKind.CALL_STARTED and newer:
        update.update(status=VisitStatus.LIVE, ended_at=None, call_event_at=event.at)
    elif (
        event.kind is CallEventKind.ROSTER
        and event.joined
        and newer
        and visit.status is not VisitStatus.LIVE
    ):
        # Someone joined after the last call-level event: the call is on.
        update.update(status=VisitStatus.LIVE, ended_at=None, call_event_at=event.at)
    if not update:
        return visit
    update["updated_at"] = now
    return visit.model_copy(update=update)


def call_ended_at(visit: Visit) -> datetime | None:
    """When the visit's call ended, if it is over (joins older than that arrive late)."""
    return visit.ended_at if visit.status is VisitStatus.ENDED else None


def visit_is_live(visit: Visit, *, now: datetime) -> bool:
    """Whether the visit's subscription should be kept (renewed, reauthorized, recreated)."""
    if visit.status is VisitStatus.ENDED:
        return visit.ended_at is None or now - visit.ended_at < ENDED_GRACE
    if visit.status is VisitStatus.LIVE:
        # A call whose CallEnded never came stops counting a day after its last change.
        return now - visit.updated_at < MAX_UNSTARTED_AGE
    return now - visit.created_at < MAX_UNSTARTED_AGE
