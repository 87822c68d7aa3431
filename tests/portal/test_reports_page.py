"""The portal's reports page over real HTTP: figures, charts (SVG with names), the table with
organizer names from the Graph stand-in, filters, the CSV export, and who may see it."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta

import pytest

from connector_core.domain.models import Environment, Region
from connector_core.domain.reports import CSV_COLUMNS, ReportStatus, VisitSummary
from devtools.sandbox.entra import CONTOSO_TID, FABRIKAM_TID
from tests.portal.helpers import PortalUser
from tests.stack import Stack

TODAY = datetime.now(UTC).date()


def _summary(tenant: str, n: int, day: date, organizer: str | None, **kw: object) -> VisitSummary:
    return VisitSummary.model_validate(
        {
            "visit_key": f"feed{n:028x}",
            "region": Region.AMERICAS,
            "tenant_id": tenant,
            "config_id": "cfg-report-page",
            "day": day,
            "environment": Environment.PRODUCTION,
            "organizer_oid": organizer,
            **kw,
        }
    )


@pytest.fixture
def seeded(stack: Stack) -> Iterator[str]:
    """Three visits of Contoso (two days), one of Fabrikam; the organizer is a seeded
    clinician. Returns that clinician's display name."""
    entra = stack.sandbox.entra
    clinician = next(u for u in entra.users_in(CONTOSO_TID) if u.kind == "clinician")
    started = datetime.combine(TODAY, datetime.min.time(), tzinfo=UTC) + timedelta(hours=9)
    rows = [
        _summary(
            CONTOSO_TID,
            1,
            TODAY,
            clinician.oid,
            status=ReportStatus.COMPLETED,
            started_at=started,
            ended_at=started + timedelta(minutes=20),
            duration_seconds=1200,
            lobby_wait_seconds=90,
            attendants=2,
            staff_count=1,
            guest_count=1,
            department_id="DEP-A",
        ),
        _summary(
            CONTOSO_TID,
            2,
            TODAY,
            clinician.oid,
            status=ReportStatus.NO_SHOW,
            attendants=1,
            staff_count=1,
            department_id="DEP-B",
        ),
        _summary(
            CONTOSO_TID,
            3,
            TODAY - timedelta(days=1),
            clinician.oid,
            status=ReportStatus.COMPLETED,
            started_at=started - timedelta(days=1),
            duration_seconds=600,
            lobby_wait_seconds=400,
            attendants=2,
            staff_count=1,
            guest_count=1,
            department_id="DEP-A",
        ),
        _summary(FABRIKAM_TID, 4, TODAY, None, status=ReportStatus.COMPLETED),
    ]
    reports = stack.container().reports
    reports.delete_before(TODAY + timedelta(days=1))  # what earlier tests' visits left
    reports.put_many(rows)
    yield clinician.display_name
    reports.delete_before(TODAY + timedelta(days=1))  # these tests' rows only live here


def test_an_auditor_sees_figures_charts_and_the_table(
    stack: Stack, person: Callable[..., PortalUser], seeded: str
) -> None:
    auditor = person()
    landing = auditor.sign_in("auditor")
    assert 'id="nav-reports"' in landing.text
    page = auditor.get("/reports")
    assert page.status_code == 200, page.text[:500]
    text = page.text
    figure = dict(re.findall(r'data-figure="(\w+)">([^<]*)<', text))
    assert figure["visits"] == "3" and figure["completed"] == "2" and figure["noShows"] == "1"
    assert figure["medianLobbyWait"] == "4:05"  # (90 + 400) / 2 s
    assert figure["totalDuration"] == "30:00"
    for chart in ("chart-visits", "chart-waits"):
        svg = re.search(rf'<svg class="chart" id="{chart}" role="img"[^>]*>', text)
        assert svg and f'aria-labelledby="{chart}-title {chart}-desc"' in svg.group(0)
        assert f'<title id="{chart}-title">' in text and f'<desc id="{chart}-desc">' in text
    assert 'id="visits-per-day"' in text and 'id="lobby-waits"' in text
    assert text.count('<tr data-status="') == 3
    assert seeded in text  # the organizer's name, from Graph at request time
    assert "feed" + f"{4:028x}" not in text  # Fabrikam's visit

    filtered = auditor.get("/reports", params={"departmentId": "DEP-B"})
    assert filtered.text.count('<tr data-status="') == 1
    assert 'data-figure="noShows">1<' in filtered.text

    export = auditor.get("/reports/export", params={"departmentId": "DEP-A"})
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["departmentId"] for r in rows} == {"DEP-A"} and len(rows) == 2
    assert seeded not in export.text  # names are for the page only


def test_bad_filters_fall_back_to_the_last_30_days(
    stack: Stack, person: Callable[..., PortalUser], seeded: str
) -> None:
    admin = person()
    admin.sign_in("admin")
    page = admin.get("/reports", params={"from": "2026-05-01", "to": "2026-04-01"})
    assert page.status_code == 200
    assert 'class="message-bar warning" role="alert"' in page.text
    assert 'data-figure="visits">3<' in page.text


def test_people_without_a_reports_role_are_refused(
    stack: Stack, person: Callable[..., PortalUser], seeded: str
) -> None:
    user = person()
    landing = user.sign_in("no-role")
    assert 'id="nav-reports"' not in landing.text
    page = user.get("/reports")
    assert page.status_code == 403
    assert "Connector.Auditor" in page.text
    assert user.get("/reports/export").status_code == 403


def test_signed_out_gets_the_sign_in_page(stack: Stack, person: Callable[..., PortalUser]) -> None:
    page = person().get("/reports")
    assert page.status_code == 200 and "/api/portal/signin" in page.text
