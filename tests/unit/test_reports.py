"""Usage reports: summaries kept by the presence worker (in-memory container, real folding),
the query rules, tenant isolation, CSV (RFC 4180) and the API function with real requests."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import azure.functions as func
import pytest

from connector_core.bootstrap import Container, reset_container, set_container
from connector_core.domain.models import Environment, Region
from connector_core.domain.reports import (
    CSV_COLUMNS,
    ReportStatus,
    VisitSummary,
    clean_department_id,
    totals_of,
)
from connector_core.domain.waiting import PATIENT_ARRIVAL_KEY, patient_arrival
from connector_core.errors import InvalidInputError
from connector_core.service import reports as service
from functions import reports as reports_fn
from tests.helpers import in_memory_container
from tests.unit.portal_fakes import AUTHORITY, TENANT_A, TENANT_B, FakeEntra
from tests.unit.presence_fakes import (
    ORGANIZER,
    STAFF_OID,
    T0,
    TENANT,
    VISIT_KEY,
    call_event,
    deliver,
    guest,
    make_container,
    roster_event,
    user,
)

DAY = T0.date()


def summary_of(container: Container) -> VisitSummary:
    found = list(container.reports.iter_range(TENANT, DAY, DAY))
    assert len(found) == 1, found
    return found[0]


def lobby(pid: str) -> dict[str, Any]:
    return {**guest(pid), "isInLobby": True}


# --- summaries from real presence processing ---------------------------------------------------


def test_a_visit_with_a_lobby_wait_is_summarised_field_by_field() -> None:
    container = make_container()
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(T0 - timedelta(seconds=30)))
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    deliver(container, roster_event(20, joined=[lobby("pat")]))
    assert summary_of(container).status is ReportStatus.IN_PROGRESS
    deliver(container, roster_event(90, joined=[guest("pat")]))  # admitted
    deliver(container, roster_event(100, joined=[user("nurse", STAFF_OID)]))
    deliver(container, roster_event(700, exited=[guest("pat")]))
    deliver(container, roster_event(760, exited=[user("doc", ORGANIZER), user("nurse", STAFF_OID)]))
    s = summary_of(container)
    assert s.status is ReportStatus.COMPLETED
    assert s.started_at == T0 + timedelta(seconds=90)
    assert s.ended_at == T0 + timedelta(seconds=760)
    assert s.duration_seconds == 670
    assert s.lobby_wait_seconds == 120  # from the launch (T0 - 30 s) to admission (T0 + 90 s)
    assert (s.attendants, s.staff_count, s.guest_count) == (3, 2, 1)
    assert s.organizer_oid == ORGANIZER
    assert s.environment is Environment.TEST
    assert s.config_id == "cfg-1" and s.tenant_id == TENANT and s.day == DAY
    wire = s.wire()
    assert set(wire) == set(CSV_COLUMNS) - {"scheduledStart"}
    assert wire["startedAt"] == "2026-03-01T10:01:30Z"
    text = json.dumps(wire)
    assert "Patient Name" not in text and "Dr Name" not in text and "pat" not in wire.values()


def test_the_visit_pages_arrival_marker_is_not_a_person() -> None:
    container = make_container()
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(T0 + timedelta(seconds=5)))
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    deliver(container, roster_event(30, joined=[guest("pat")]))
    deliver(container, roster_event(90, exited=[guest("pat"), user("doc", ORGANIZER)]))
    s = summary_of(container)
    assert s.status is ReportStatus.COMPLETED and s.ended_at == T0 + timedelta(seconds=90)
    assert (s.attendants, s.guest_count) == (2, 1)


def test_without_a_launch_the_lobby_wait_runs_from_the_first_sighting() -> None:
    container = make_container()
    deliver(
        container,
        roster_event(0, joined=[user("doc", ORGANIZER)]),
        roster_event(15, joined=[lobby("pat")]),
        roster_event(75, joined=[guest("pat")]),
    )
    s = summary_of(container)
    assert s.lobby_wait_seconds == 60
    assert s.status is ReportStatus.IN_PROGRESS and s.ended_at is None


def test_a_no_show_and_the_call_ending() -> None:
    container = make_container()
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    deliver(container, call_event("CallEnded", 900))
    s = summary_of(container)
    assert s.status is ReportStatus.NO_SHOW
    assert s.started_at is None and s.duration_seconds is None and s.lobby_wait_seconds is None
    assert s.ended_at == T0 + timedelta(seconds=900)
    assert (s.attendants, s.staff_count, s.guest_count) == (1, 1, 0)


def test_reordered_and_duplicated_delivery_gives_the_same_summary() -> None:
    events = [
        roster_event(0, joined=[user("doc", ORGANIZER)]),
        roster_event(10, joined=[lobby("pat")]),
        roster_event(40, joined=[guest("pat")]),
        roster_event(300, exited=[guest("pat")]),
        roster_event(320, exited=[user("doc", ORGANIZER)]),
    ]
    in_order = make_container()
    for event in events:
        deliver(in_order, event)
    shuffled = make_container()
    for event in [events[4], events[2], events[0], events[2], events[3], events[1], events[4]]:
        deliver(shuffled, event)
    assert summary_of(in_order) == summary_of(shuffled)
    assert summary_of(in_order).duration_seconds == 280


def test_people_who_never_overlap_make_a_no_show() -> None:
    container = make_container()
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    deliver(container, roster_event(60, exited=[user("doc", ORGANIZER)]))
    deliver(container, roster_event(120, joined=[guest("pat")]))
    deliver(container, roster_event(180, exited=[guest("pat")]))
    s = summary_of(container)
    assert s.status is ReportStatus.NO_SHOW and s.started_at is None
    assert s.ended_at == T0 + timedelta(seconds=180)


def test_the_department_is_the_visits() -> None:
    container = make_container()
    stored = container.visits.get(VISIT_KEY)
    visit = stored.record.model_copy(update={"department_id": "DEP-101"})
    container.visits.update(visit, etag=stored.etag)
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    assert summary_of(container).department_id == "DEP-101"


# --- the lobby wait: from the patient's arrival, kept on the patient's own row ------------------


def patient_row(container: Container, pid: str) -> Any:
    visit = container.visits.get(VISIT_KEY).record
    rows = container.visits.participants(visit)
    (row,) = [
        p for p in rows if p.role.value == "patient" and p.participant_key != PATIENT_ARRIVAL_KEY
    ]
    return row


def test_a_relaunch_after_admission_never_changes_the_lobby_wait() -> None:
    container = make_container()
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(T0 - timedelta(seconds=40)))
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    deliver(container, roster_event(20, joined=[guest("pat")]))  # admitted: wait 60 s
    assert patient_row(container, "pat").lobby_at == T0 - timedelta(seconds=40)
    assert summary_of(container).lobby_wait_seconds == 60
    # The patient drops, relaunches (the arrival row is overwritten) and comes back.
    deliver(container, roster_event(100, exited=[guest("pat")]))
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(T0 + timedelta(seconds=110)))
    deliver(container, roster_event(130, joined=[guest("pat")]))
    deliver(container, roster_event(20, joined=[guest("pat")]))  # a duplicate, late
    assert patient_row(container, "pat").lobby_at == T0 - timedelta(seconds=40)
    assert summary_of(container).lobby_wait_seconds == 60


def test_an_arrival_after_the_admission_is_not_the_lobby_start() -> None:
    container = make_container()
    deliver(container, roster_event(0, joined=[user("doc", ORGANIZER)]))
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(T0 + timedelta(seconds=50)))
    deliver(container, roster_event(45, joined=[guest("pat")]))  # joined by link, no launch
    assert patient_row(container, "pat").lobby_at is None
    assert summary_of(container).lobby_wait_seconds is None


def test_the_lobby_start_is_the_same_in_any_delivery_order() -> None:
    events = [
        roster_event(0, joined=[user("doc", ORGANIZER)]),
        roster_event(10, joined=[lobby("pat")]),
        roster_event(40, joined=[guest("pat")]),
        roster_event(300, exited=[guest("pat")]),
        roster_event(320, exited=[user("doc", ORGANIZER)]),
    ]
    summaries = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 2, 3, 1, 4], [2, 2, 1, 0, 3, 4]):
        container = make_container()
        container.visits.record_patient_arrival(
            VISIT_KEY, patient_arrival(T0 - timedelta(seconds=5))
        )
        for index in order:
            deliver(container, events[index])
        assert patient_row(container, "pat").lobby_at == T0 - timedelta(seconds=5)
        summaries.append(summary_of(container))
    assert summaries[0] == summaries[1] == summaries[2]
    assert summaries[0].lobby_wait_seconds == 45  # the launch, not the lobby sighting (T0 + 10 s)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("1234", "1234"),
        ("CARDIO.01", "CARDIO.01"),
        ("%PERFDEPID%", None),
        ("=cmd()", None),
        ("-5", None),
        ("a" * 65, None),
        ("", None),
        (None, None),
        ("dep 1", None),
    ],
)
def test_department_ids(raw: str | None, clean: str | None) -> None:
    assert clean_department_id(raw) == clean


# --- queries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"to": "2026-03-01"}, "from"),
        ({"from": "2026-03-01"}, "to"),
        ({"from": "2026-3-1", "to": "2026-03-01"}, "from"),
        ({"from": "2026-02-30", "to": "2026-03-01"}, "from"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "from"),
        ({"from": "2025-01-01", "to": "2026-01-02"}, "to"),
        ({"from": "2026-03-01", "to": "2026-03-01", "configId": "x/../y"}, "configId"),
        ({"from": "2026-03-01", "to": "2026-03-01", "configId": ""}, "configId"),
        ({"from": "2026-03-01", "to": "2026-03-01", "departmentId": " DEP"}, "departmentId"),
        ({"from": "2026-03-01", "to": "2026-03-01", "departmentId": "%PERFDEPID%"}, "departmentId"),
    ],
)
def test_bad_queries_say_what_is_wrong(params: dict[str, str], parameter: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        service.parse_query(params)
    assert caught.value.extra["parameter"] == parameter


def test_a_366_day_range_is_allowed() -> None:
    query = service.parse_query({"from": "2024-01-01", "to": "2024-12-31"})
    assert (query.last - query.first).days + 1 == 366


def _summary(tenant: str, day: date, n: int, **kw: Any) -> VisitSummary:
    return VisitSummary(
        visit_key=f"{n:032x}",
        region=Region.AMERICAS,
        tenant_id=tenant,
        config_id=kw.pop("config_id", "cfg-1"),
        day=day,
        **kw,
    )


def test_ranges_span_months_and_stay_inside_the_tenant() -> None:
    container = in_memory_container()
    repo = container.reports
    days = [date(2026, 1, 31), date(2026, 2, 1), date(2026, 2, 28), date(2026, 3, 1)]
    repo.put_many([_summary(TENANT_A, d, i) for i, d in enumerate(days)])
    repo.put(_summary(TENANT_B, date(2026, 2, 1), 99))
    got = list(repo.iter_range(TENANT_A, date(2026, 2, 1), date(2026, 2, 28)))
    assert [s.day for s in got] == [date(2026, 2, 1), date(2026, 2, 28)]
    assert all(s.tenant_id == TENANT_A for s in got)
    assert [
        s.visit_key for s in repo.iter_range(TENANT_B, date(2026, 1, 1), date(2026, 3, 31))
    ] == [f"{99:032x}"]


def test_pages_are_read_lazily() -> None:
    container = in_memory_container()
    container.reports.put_many([_summary(TENANT_A, DAY, i) for i in range(2500)])
    store: Any = container.store
    before = store.operations
    it = container.reports.iter_range(TENANT_A, DAY, DAY)
    next(it)
    assert store.operations - before == 1  # one page of 1000, not the 3 the range needs
    assert sum(1 for _ in it) == 2499


def test_delete_before_removes_old_days_of_every_tenant() -> None:
    container = in_memory_container()
    repo = container.reports
    repo.put_many(
        [_summary(TENANT_A, date(2025, 1, 1) + timedelta(days=i), i) for i in range(120)]
        + [_summary(TENANT_B, date(2025, 2, 10), 500)]
    )
    assert repo.delete_before(date(2025, 3, 15)) == 73 + 1
    left = list(repo.iter_range(TENANT_A, date(2025, 1, 1), date(2025, 12, 31)))
    assert left[0].day == date(2025, 3, 15) and len(left) == 120 - 73
    assert list(repo.iter_range(TENANT_B, date(2025, 1, 1), date(2025, 12, 31))) == []
    assert repo.delete_before(date(2025, 3, 15)) == 0


def test_delete_before_is_bounded_per_call_and_finishes_later() -> None:
    container = in_memory_container()
    repo = container.reports
    repo.put_many(
        [_summary(TENANT_A, date(2025, 1, 1) + timedelta(days=i), i) for i in range(120)]
        + [_summary(TENANT_B, date(2025, 2, 10), 500)]
    )
    done = [repo.delete_before(date(2025, 3, 15), limit=30) for _ in range(4)]
    assert done == [30, 30, 14, 0]  # 74 old summaries, at most 30 a call
    left = list(repo.iter_range(TENANT_A, date(2025, 1, 1), date(2025, 12, 31)))
    assert left[0].day == date(2025, 3, 15) and len(left) == 120 - 73
    assert list(repo.iter_range(TENANT_B, date(2025, 1, 1), date(2025, 12, 31))) == []


def test_csv_quotes_commas_quotes_and_line_breaks() -> None:
    rows = [("plain", 'say "hi"', "a,b", "line\nbreak", "")]
    text = "".join(service.csv_rows(rows, header=("a", "b", "c", "d", "e")))
    assert text == 'a,b,c,d,e\r\nplain,"say ""hi""","a,b","line\nbreak",\r\n'
    assert list(csv.reader(io.StringIO(text))) == [["a", "b", "c", "d", "e"], list(rows[0])]


def test_totals_and_medians() -> None:
    rows = [
        _summary(
            TENANT_A,
            DAY,
            1,
            status=ReportStatus.COMPLETED,
            duration_seconds=600,
            lobby_wait_seconds=30,
        ),
        _summary(
            TENANT_A,
            DAY,
            2,
            status=ReportStatus.COMPLETED,
            duration_seconds=300,
            lobby_wait_seconds=90,
        ),
        _summary(TENANT_A, DAY, 3, status=ReportStatus.COMPLETED, duration_seconds=900),
        _summary(TENANT_A, DAY, 4, status=ReportStatus.NO_SHOW),
    ]
    assert totals_of(rows).wire() == {
        "visits": 4,
        "completed": 3,
        "noShows": 1,
        "medianLobbyWaitSeconds": 60.0,
        "medianDurationSeconds": 600.0,
        "totalDurationSeconds": 1800,
    }


# --- the API function -------------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[tuple[Container, FakeEntra]]:
    entra = FakeEntra()
    container = in_memory_container(ENTRA_AUTHORITY_HOST=AUTHORITY)
    container.portal_tokens = entra.validator()
    container.reports.put_many(
        [
            _summary(
                TENANT_A,
                date(2026, 3, 1),
                1,
                status=ReportStatus.COMPLETED,
                duration_seconds=600,
                environment=Environment.PRODUCTION,
                department_id="DEP-1",
            ),
            _summary(TENANT_A, date(2026, 3, 2), 2, status=ReportStatus.NO_SHOW, config_id="cfg-2"),
            _summary(TENANT_B, date(2026, 3, 1), 3, status=ReportStatus.COMPLETED),
        ]
    )
    set_container(container)
    yield container, entra
    reset_container()


def call(
    entra: FakeEntra,
    params: dict[str, str],
    *,
    roles: tuple[str, ...] = ("Connector.Auditor",),
    tid: str = TENANT_A,
    headers: dict[str, str] | None = None,
) -> func.HttpResponse:
    token = entra.token(tid=tid, roles=roles)
    response = reports_fn.report_visits(
        func.HttpRequest(
            method="GET",
            url="http://127.0.0.1:7071/api/reports/visits",
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
            params=params,
            body=b"",
        )
    )
    return response


RANGE = {"from": "2026-03-01", "to": "2026-03-31"}


def test_json_report_of_the_callers_tenant(api: tuple[Container, FakeEntra]) -> None:
    _, entra = api
    response = call(entra, RANGE)
    assert response.status_code == 200, response.get_body()
    body = json.loads(response.get_body())
    assert set(body) == {"from", "to", "generatedAt", "summary", "visits"}
    assert body["summary"]["visits"] == 2 and body["summary"]["noShows"] == 1
    assert [v["visitKey"] for v in body["visits"]] == [f"{1:032x}", f"{2:032x}"]
    assert body["visits"][0]["environment"] == "production"
    other = json.loads(call(entra, RANGE, tid=TENANT_B).get_body())
    assert [v["visitKey"] for v in other["visits"]] == [f"{3:032x}"]
    filtered = json.loads(call(entra, {**RANGE, "configId": "cfg-2"}).get_body())
    assert [v["configId"] for v in filtered["visits"]] == ["cfg-2"]
    by_department = json.loads(call(entra, {**RANGE, "departmentId": "DEP-1"}).get_body())
    assert [v["departmentId"] for v in by_department["visits"]] == ["DEP-1"]


@pytest.mark.parametrize("how", ["format", "accept"])
def test_csv_report(api: tuple[Container, FakeEntra], how: str) -> None:
    _, entra = api
    if how == "format":
        response = call(entra, {**RANGE, "format": "csv"}, roles=("Connector.Admin",))
    else:
        response = call(entra, RANGE, headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    text = response.get_body().decode()
    assert text.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["status"] for r in rows] == ["completed", "no_show"]
    assert rows[1]["durationSeconds"] == "" and rows[0]["durationSeconds"] == "600"


@pytest.mark.parametrize(
    ("params", "roles", "status"),
    [
        (RANGE, (), 403),
        (RANGE, ("Connector.Reader",), 403),
        ({"from": "2026-03-31", "to": "2026-03-01"}, ("Connector.Admin",), 400),
        ({"from": "2025-01-01", "to": "2026-03-01"}, ("Connector.Admin",), 400),
        ({"from": "yesterday", "to": "2026-03-01"}, ("Connector.Admin",), 400),
        ({**RANGE, "format": "xml"}, ("Connector.Admin",), 400),
    ],
)
def test_refusals_are_problem_json(
    api: tuple[Container, FakeEntra], params: dict[str, str], roles: tuple[str, ...], status: int
) -> None:
    _, entra = api
    response = call(entra, params, roles=roles)
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    assert json.loads(response.get_body())["correlationId"]


def test_without_a_token_401(api: tuple[Container, FakeEntra]) -> None:
    response = reports_fn.report_visits(
        func.HttpRequest(
            method="GET", url="http://127.0.0.1:7071/api/reports/visits", params=RANGE, body=b""
        )
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_generated_at_is_utc(api: tuple[Container, FakeEntra]) -> None:
    container, entra = api
    container.clock = lambda: datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
    body = json.loads(call(entra, RANGE).get_body())
    assert body["generatedAt"] == "2026-04-01T12:00:00Z"
