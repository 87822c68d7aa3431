"""Pure presence rules: parsing Graph call events, participant state, write-back transitions."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector_core.domain.models import (
    ParticipantRole,
    ParticipantStatus,
    Region,
    Visit,
    VisitStatus,
)
from connector_core.domain.presence import (
    CallEvent,
    CallEventKind,
    IdentityKind,
    RosterEntry,
    TransitionKind,
    apply_event,
    apply_to_visit,
    parse_call_event,
    parse_graph_time,
    transitions_of,
    visit_is_live,
    writeback_key,
)
from connector_core.errors import InvalidInputError

T0 = datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC)
ORGANIZER = "F92CA67F-0564-414B-8CAA-8C95B8099928"


def pk(pid: str) -> str:
    return f"p:{pid}"


def uk(oid: str) -> str:
    return f"u:{oid}"


def parse(resource: dict[str, Any]) -> CallEvent:
    return parse_call_event(resource, participant_key=pk, user_key=uk)


def roster(at: str, joined: list[Any] = (), exited: list[Any] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "@odata.type": "#Microsoft.Graph.onlineMeeting",
        "eventType": "Microsoft.Communication.CallRosterUpdate",
        "eventDateTime": at,
        "activeParticipants@joined": list(joined),
        "activeParticipants@exited": list(exited),
    }


def test_parses_graphs_documented_roster_update_pascal_case() -> None:
    # The example of "Get change notifications for Teams meeting call event updates".
    event = parse(
        {
            "@odata.type": "#Microsoft.Graph.onlineMeeting",
            "eventType": "Microsoft.Communication.CallRosterUpdate",
            "eventDateTime": "2022-02-28T00:00:00.0000000Z",
            "activeParticipants@joined": [
                {
                    "Id": "a4d67b60-56a5-4202-9f1c-f123ff40621e",
                    "Identity": {
                        "User": {
                            "Id": ORGANIZER,
                            "DisplayName": "user display name",
                            "TenantId": "85045508-f5bd-405e-a553-52700f86e29c",
                        }
                    },
                }
            ],
            "activeParticipants@exited": [
                {
                    "Id": "11141402-1b62-4795-b540-4ffee8544231",
                    "Identity": {
                        "AzureCommunicationServicesUser": {
                            "AzureCommunicationServicesResourceId": "534c",
                            "Id": "8:acs:534c_28f0",
                            "DisplayName": "acs user display name",
                        }
                    },
                }
            ],
        }
    )
    assert event.kind is CallEventKind.ROSTER
    assert event.at == datetime(2022, 2, 28, tzinfo=UTC)
    (joined,) = event.joined
    assert joined == RosterEntry(
        participant_key=pk("a4d67b60-56a5-4202-9f1c-f123ff40621e"),
        kind=IdentityKind.USER,
        user_key=uk(ORGANIZER.lower()),
    )
    (exited,) = event.exited
    assert exited.kind is IdentityKind.ACS and exited.user_key is None
    assert "display" not in event.model_dump_json().lower()


def test_parses_camel_case_guest_and_skips_applications() -> None:
    event = parse(
        roster(
            "2026-03-01T10:00:00.1234567Z",
            joined=[
                {"id": "g1", "identity": {"guest": {"id": "g1", "displayName": "Pat"}}},
                {"id": "bot", "identity": {"application": {"id": "app", "displayName": "Rec"}}},
                {"identity": {"phone": {"id": "+15550100"}}},
            ],
        )
    )
    assert [e.kind for e in event.joined] == [IdentityKind.GUEST, IdentityKind.PHONE]
    assert event.joined[1].participant_key == pk("+15550100")  # falls back to the identity id
    assert event.at == T0 + timedelta(microseconds=123456)


@pytest.mark.parametrize(
    "resource",
    [
        {"eventType": "Microsoft.Communication.CallRosterUpdate"},  # no time
        {"eventType": "Microsoft.Communication.Other", "eventDateTime": "2026-03-01T10:00:00Z"},
        {"eventDateTime": "2026-03-01T10:00:00Z"},
        roster("not a time"),
        roster("2026-03-01T10:00:00Z", joined=["x"]),  # type: ignore[list-item]
        roster("2026-03-01T10:00:00Z", joined=[{"id": "a"}]),
        roster("2026-03-01T10:00:00Z", joined=[{"id": "a", "identity": {"user": {}}}]),
        {**roster("2026-03-01T10:00:00Z"), "activeParticipants@joined": {"a": 1}},
    ],
)
def test_malformed_events_raise_invalid_input(resource: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        parse(resource)


def test_graph_time_variants() -> None:
    assert parse_graph_time("2026-03-01T10:00:00Z") == T0
    assert parse_graph_time("2026-03-01T11:00:00+01:00") == T0
    assert parse_graph_time("2026-03-01T10:00:00.5Z") == T0 + timedelta(milliseconds=500)
    assert parse_graph_time("2026-03-01T10:00:00") == T0


def entry(pid: str, kind: IdentityKind = IdentityKind.GUEST, **kw: Any) -> RosterEntry:
    return RosterEntry(participant_key=pid, kind=kind, **kw)


def ev(at: int, joined: list[RosterEntry] = (), exited: list[RosterEntry] = ()) -> CallEvent:  # type: ignore[assignment]
    return CallEvent(
        kind=CallEventKind.ROSTER,
        at=T0 + timedelta(seconds=at),
        joined=tuple(joined),
        exited=tuple(exited),
    )


CLINICIAN = entry("doc", IdentityKind.USER, user_key="u:doc")
STAFF = entry("nurse", IdentityKind.USER, user_key="u:nurse")
PATIENT = entry("pat")


def test_roles_from_identity() -> None:
    event = ev(0, joined=[CLINICIAN, STAFF, PATIENT, entry("acs", IdentityKind.ACS)])
    roles = {t.participant_key: t.role for t in transitions_of(event, clinician_user_key="u:doc")}
    assert roles == {
        "doc": ParticipantRole.CLINICIAN,
        "nurse": ParticipantRole.STAFF,
        "pat": ParticipantRole.PATIENT,
        "acs": ParticipantRole.PATIENT,
    }
    # Without a known organizer every Entra user is staff.
    assert {t.role for t in transitions_of(ev(0, joined=[CLINICIAN]), clinician_user_key=None)} == {
        ParticipantRole.STAFF
    }


def test_join_leave_in_order_and_reordered_give_the_same_state() -> None:
    join, leave = ev(1, joined=[PATIENT]), ev(5, exited=[PATIENT])
    in_order = apply_event(
        apply_event((), join, clinician_user_key=None), leave, clinician_user_key=None
    )
    reordered = apply_event(
        apply_event((), leave, clinician_user_key=None), join, clinician_user_key=None
    )
    assert in_order == reordered
    (state,) = in_order
    assert state.status is ParticipantStatus.LEFT
    assert state.joined_at == T0 + timedelta(seconds=1)
    assert state.left_at == T0 + timedelta(seconds=5)


def test_rejoin_after_leave_is_connected_since_the_rejoin() -> None:
    states = ()
    for event in (ev(1, joined=[PATIENT]), ev(2, exited=[PATIENT]), ev(3, joined=[PATIENT])):
        states = apply_event(states, event, clinician_user_key=None)
    (state,) = states
    assert state.status is ParticipantStatus.CONNECTED
    assert state.joined_at == T0 + timedelta(seconds=3) and state.left_at is None


def test_duplicates_change_nothing() -> None:
    event = ev(1, joined=[PATIENT, CLINICIAN])
    once = apply_event((), event, clinician_user_key="u:doc")
    assert apply_event(once, event, clinician_user_key="u:doc") == once


def test_lobby_entries_are_waiting_and_not_written_back() -> None:
    lobby = ev(1, joined=[entry("pat", in_lobby=True)])
    (state,) = apply_event((), lobby, clinician_user_key=None)
    assert state.status is ParticipantStatus.LOBBY and state.joined_at is None
    assert transitions_of(lobby, clinician_user_key=None) == []
    admitted = apply_event((state,), ev(4, joined=[PATIENT]), clinician_user_key=None)
    assert admitted[0].status is ParticipantStatus.CONNECTED


def test_facts_for_reports_first_join_last_leave_and_lobby() -> None:
    history = [
        ev(1, joined=[entry("pat", in_lobby=True)]),
        ev(4, joined=[PATIENT]),
        ev(6, exited=[PATIENT]),
        ev(8, joined=[PATIENT]),
        ev(9, exited=[PATIENT]),
    ]
    for order in (history, list(reversed(history))):
        states: tuple[Any, ...] = ()
        for event in order:
            states = apply_event(states, event, clinician_user_key=None)
        (state,) = states
        assert state.lobby_at == T0 + timedelta(seconds=1)
        assert state.first_joined_at == T0 + timedelta(seconds=4)
        assert state.last_left_at == T0 + timedelta(seconds=9)
        assert state.lobby_seconds == 3.0


def test_call_ended_closes_open_connections_without_write_back() -> None:
    states = apply_event((), ev(1, joined=[PATIENT, CLINICIAN]), clinician_user_key="u:doc")
    ended = CallEvent(kind=CallEventKind.CALL_ENDED, at=T0 + timedelta(seconds=9))
    after = apply_event(states, ended, clinician_user_key="u:doc")
    assert {s.status for s in after} == {ParticipantStatus.LEFT}
    assert transitions_of(ended, clinician_user_key="u:doc") == []


def test_transitions_and_keys_depend_on_the_event_only() -> None:
    event = ev(2, joined=[PATIENT], exited=[STAFF])
    kinds = [(t.participant_key, t.kind) for t in transitions_of(event, clinician_user_key=None)]
    assert kinds == [("pat", TransitionKind.CONNECT), ("nurse", TransitionKind.DISCONNECT)]
    a = [writeback_key("v1", t) for t in transitions_of(event, clinician_user_key=None)]
    b = [writeback_key("v1", t) for t in transitions_of(event, clinician_user_key=None)]
    assert a == b and len(set(a)) == 2
    assert writeback_key("v2", transitions_of(event, clinician_user_key=None)[0]) != a[0]


# Property: any delivery order, with duplicates, converges to the in-order state.
_PEOPLE = [PATIENT, CLINICIAN, STAFF]


@st.composite
def histories(draw: st.DrawFn) -> list[CallEvent]:
    events: list[CallEvent] = []
    present: set[str] = set()
    for second in range(1, draw(st.integers(1, 12)) + 1):
        person = draw(st.sampled_from(_PEOPLE))
        if person.participant_key in present:
            present.discard(person.participant_key)
            events.append(ev(second, exited=[person]))
        else:
            present.add(person.participant_key)
            events.append(ev(second, joined=[person]))
    return events


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.data())
def test_any_order_with_duplicates_converges(
    events: list[CallEvent], rnd: Any, data: st.DataObject
) -> None:
    expected = ()
    for event in events:
        expected = apply_event(expected, event, clinician_user_key="u:doc")
    delivered = events + data.draw(st.lists(st.sampled_from(events), max_size=4))
    rnd.shuffle(delivered)
    state = ()
    for event in delivered:
        state = apply_event(state, event, clinician_user_key="u:doc")
    for got, want in itertools.zip_longest(state, expected):
        assert got is not None and want is not None
        assert (got.participant_key, got.status, got.left_at, got.last_event_at) == (
            want.participant_key,
            want.status,
            want.left_at,
            want.last_event_at,
        )
        # The facts reports read are the same whatever the order (min / max over events).
        assert (got.first_joined_at, got.last_left_at, got.lobby_at) == (
            want.first_joined_at,
            want.last_left_at,
            want.lobby_at,
        )
        if want.status is ParticipantStatus.CONNECTED:
            assert got.joined_at == want.joined_at


def visit(**kw: Any) -> Visit:
    values: dict[str, Any] = {
        "visit_key": "v" * 32,
        "region": Region.AMERICAS,
        "config_id": "cfg",
        "tenant_id": "tid",
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(kw)
    return Visit.model_validate(values)


def test_visit_call_status_by_event_time() -> None:
    started = CallEvent(kind=CallEventKind.CALL_STARTED, at=T0 + timedelta(seconds=1))
    ended = CallEvent(kind=CallEventKind.CALL_ENDED, at=T0 + timedelta(seconds=8))
    now = T0 + timedelta(seconds=10)
    v = apply_to_visit(visit(), ended, now=now)
    v = apply_to_visit(v, started, now=now)  # late, older: ignored
    assert v.status is VisitStatus.ENDED and v.ended_at == ended.at
    again = apply_to_visit(v, ev(12, joined=[PATIENT]), now=now)
    assert again.status is VisitStatus.LIVE and again.ended_at is None
    assert apply_to_visit(again, ev(12, joined=[PATIENT]), now=now) is again


def test_visit_liveness() -> None:
    assert visit_is_live(visit(), now=T0 + timedelta(hours=2))
    assert not visit_is_live(visit(), now=T0 + timedelta(hours=25))
    ended = visit(status=VisitStatus.ENDED, ended_at=T0)
    assert visit_is_live(ended, now=T0 + timedelta(minutes=10))
    assert not visit_is_live(ended, now=T0 + timedelta(minutes=31))
    assert visit_is_live(visit(status=VisitStatus.LIVE), now=T0 + timedelta(hours=3))
