"""The portal's reports page (``GET /api/portal/reports``) and its CSV export
(``GET /api/portal/reports/export``), for admins and auditors, over the same use case as
``GET /api/reports/visits`` (:mod:`connector_core.service.reports`).

Figures, visits per day and the lobby-wait distribution are computed while the summaries stream
by (page by page); the table shows the first ``TABLE_ROWS`` visits and the CSV has them all.
Organizer names come from Microsoft Graph with the signed-in user's delegated token at request
time, for this page only: never stored, never logged (the ids show when Graph cannot tell).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from connector_core.domain.reports import ReportStatus, TotalsBuilder, VisitSummary
from connector_core.errors import AuthenticationError, DependencyError, InvalidInputError
from connector_core.logs import get_logger, log_event
from connector_core.service.portal_web.charts import Bar, bar_chart
from connector_core.service.portal_web.context import Page, adapters_for, guard, require_session
from connector_core.service.portal_web.i18n import N_
from connector_core.service.portal_web.render import PORTAL_PATH
from connector_core.service.portal_web.web import WebResponse

if TYPE_CHECKING:
    from connector_core.service.portal_web.sessions import PortalSession
    from connector_core.service.reports import ReportQuery

__all__ = ["TABLE_ROWS", "WAIT_BUCKETS", "reports", "reports_export"]

TABLE_ROWS = 500
# Lobby-wait buckets: (upper bound in seconds, exclusive; label).
WAIT_BUCKETS: tuple[tuple[float, str], ...] = (
    (60, N_("under 1 min")),
    (120, N_("1\u20132 min")),
    (300, N_("2\u20135 min")),
    (600, N_("5\u201310 min")),
    (900, N_("10\u201315 min")),
    (1800, N_("15\u201330 min")),
    (float("inf"), N_("30 min or more")),
)
REPORT_STATUSES = {
    "completed": N_("Completed"),
    "no_show": N_("No-show"),
    "in_progress": N_("In progress"),
}
_log = get_logger("portal.web")


@dataclass(frozen=True)
class DayRow:
    day: date
    completed: int
    no_show: int
    in_progress: int

    @property
    def total(self) -> int:
        return self.completed + self.no_show + self.in_progress


@dataclass(frozen=True)
class WaitRow:
    label: str
    count: int


def _require_reader(page: Page) -> PortalSession:
    from connector_core.service.reports import authorize

    session = require_session(page)
    authorize(session.caller)
    return session


def _query(page: Page) -> tuple[ReportQuery, bool]:
    """The filters asked for, or the last 30 days; True when what was asked is not valid."""
    from connector_core.service import reports as service

    params = {k: v for k, v in page.req.query.items() if v}
    first, last = service.default_range(page.root)
    params.setdefault("from", first.isoformat())
    params.setdefault("to", last.isoformat())
    try:
        return service.parse_query(params), False
    except InvalidInputError:
        return service.ReportQuery(first=first, last=last), True


def duration(seconds: int | float | None) -> str:
    """``m:ss`` or ``h:mm:ss`` (the same in every language)."""
    if seconds is None:
        return "\u2013"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _bucket(seconds: int) -> int:
    return next(i for i, (bound, _) in enumerate(WAIT_BUCKETS) if seconds < bound)


def _names(page: Page, session: PortalSession, oids: list[str]) -> dict[str, str]:
    """Organizer names for display (Graph, the user's delegated token); empty when Graph is
    unavailable: the page then shows the object ids."""
    if not oids or not session.home_account_id or not session.token_cache:
        return {}
    adapters = adapters_for(page.root)
    try:
        return adapters.directory.names(adapters.graph_token(session), oids)
    except (AuthenticationError, DependencyError) as error:
        log_event(_log, "portal.report_names_failed", level=30, error=type(error).__name__)
        return {}


@guard
def reports(page: Page) -> WebResponse:
    """``GET /api/portal/reports?from&to&configId&departmentId``."""
    from connector_core.service import configs as config_service
    from connector_core.service import reports as service

    session = _require_reader(page)
    query, invalid = _query(page)
    configs = {
        v.record.id: v.record for v in config_service.list_configs(page.root, session.caller)
    }
    per_day: dict[date, Counter[str]] = {}
    waits: Counter[int] = Counter()
    shown: list[VisitSummary] = []
    builder = TotalsBuilder()
    count = 0
    for summary in service.summaries(page.root, session.caller, query):
        count += 1
        per_day.setdefault(summary.day, Counter())[summary.status.value] += 1
        if summary.lobby_wait_seconds is not None:
            waits[_bucket(summary.lobby_wait_seconds)] += 1
        if len(shown) < TABLE_ROWS:
            shown.append(summary)
        builder.add(summary)
    totals = builder.result()
    days = [query.first + timedelta(days=i) for i in range((query.last - query.first).days + 1)]
    day_rows = [
        DayRow(
            day=d,
            completed=per_day.get(d, Counter())["completed"],
            no_show=per_day.get(d, Counter())["no_show"],
            in_progress=per_day.get(d, Counter())["in_progress"],
        )
        for d in days
    ]
    busiest = max(day_rows, key=lambda r: r.total)
    visits_chart = bar_chart(
        chart_id="chart-visits",
        title=page.t(N_("Visits per day")),
        description=page.t(
            N_(
                "Bar chart of visits per day from %(first)s to %(last)s: %(visits)s visits, "
                "%(no_shows)s of them no-shows (hatched). Busiest day: %(busiest)s with "
                "%(most)s visits. The same figures are in the table below the chart."
            ),
            first=query.first.isoformat(),
            last=query.last.isoformat(),
            visits=totals.visits,
            no_shows=totals.no_shows,
            busiest=busiest.day.isoformat(),
            most=busiest.total,
        ),
        bars=[
            Bar(label=r.day.strftime("%m-%d"), segments=(r.completed + r.in_progress, r.no_show))
            for r in day_rows
        ],
        series=(page.t(N_("Completed or in progress")), page.t(N_("No-show"))),
    )
    wait_rows = [WaitRow(label=label, count=waits[i]) for i, (_, label) in enumerate(WAIT_BUCKETS)]
    waits_chart = bar_chart(
        chart_id="chart-waits",
        title=page.t(N_("Lobby wait")),
        description=page.t(
            N_(
                "Bar chart of how long patients waited from their launch to being admitted, "
                "%(count)s visits in seven ranges from under 1 minute to 30 minutes or more; "
                "median %(median)s. The same figures are in the table below the chart."
            ),
            count=sum(waits.values()),
            median=duration(totals.median_lobby_wait_seconds),
        ),
        bars=[Bar(label=page.t(r.label), segments=(r.count,)) for r in wait_rows],
        series=(page.t(N_("Visits")),),
    )
    names = _names(page, session, [s.organizer_oid for s in shown if s.organizer_oid])
    rows = [
        {
            "day": s.day,
            "started_at": s.started_at,
            "duration": duration(s.duration_seconds),
            "lobby_wait": duration(s.lobby_wait_seconds),
            "attendants": s.attendants,
            "staff": s.staff_count,
            "guests": s.guest_count,
            "organizer": names.get((s.organizer_oid or "").lower()) or s.organizer_oid or "\u2013",
            "department": s.department_id or "\u2013",
            "environment": s.environment.value if s.environment else "",
            "status": REPORT_STATUSES[s.status.value],
            "status_key": s.status.value,
        }
        for s in shown
    ]
    filters = {
        "from": query.first.isoformat(),
        "to": query.last.isoformat(),
        "configId": query.config_id or "",
        "departmentId": query.department_id or "",
    }
    export = urlencode({k: v for k, v in filters.items() if v})
    log_event(_log, "portal.report_viewed", visits=count)
    return page.html(
        "reports.html",
        title=N_("Reports"),
        filters=filters,
        invalid=invalid,
        configs=[
            {
                "id": c.id,
                "label": f"{c.fhir_base_url} ({page.t(_environment(c.environment.value))})",
            }
            for c in configs.values()
        ],
        totals=totals,
        median_wait=duration(totals.median_lobby_wait_seconds),
        median_duration=duration(totals.median_duration_seconds),
        total_duration=duration(totals.total_duration_seconds),
        visits_chart=visits_chart,
        waits_chart=waits_chart,
        day_rows=day_rows,
        wait_rows=wait_rows,
        rows=rows,
        count=count,
        truncated=count > len(rows),
        table_rows=TABLE_ROWS,
        export_url=f"{PORTAL_PATH}/reports/export?{export}",
        completed_key=ReportStatus.COMPLETED.value,
    )


def _environment(key: str) -> str:
    return {"test": N_("Test"), "production": N_("Production")}.get(key, key)


@guard
def reports_export(page: Page) -> WebResponse:
    """``GET /api/portal/reports/export?...``: the report as CSV (the API's own rows)."""
    from connector_core.service import reports as service

    session = _require_reader(page)
    query, _ = _query(page)
    body = b"".join(service.csv_chunks(page.root, session.caller, query))
    name = service.csv_filename(query)
    response = WebResponse(
        body=body,
        content_type="text/csv; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )
    return page._finish(response)
