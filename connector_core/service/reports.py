"""Usage reports (docs/design.md section 5, "Reports"): keeping visit summaries, answering
``GET /reports/visits`` as JSON or CSV, and the figures the portal's reports page shows.

Summaries are written by the presence worker: a batch of a visit's events that changes its rows
schedules a ``summary`` message a few seconds later (``PresenceOptions.summary_delay_seconds``;
the batches of those seconds share it), which runs ``refresh_summary``: one query for the
visit row and its participant rows, one write. The summary is derived from the stored rows alone
(``domain.reports.summarize``), so duplicates and reordering change nothing, and a refresh
always reads rows committed before it was due. The lobby wait starts at the patients' own
``lobby_at``, where the worker copied the patient's arrival at their first admission.
Reading is for ``Connector.Admin`` and ``Connector.Auditor`` of the caller's own tenant; the
CSV is produced row by row from paged queries (``csv_chunks``), never a list of every visit.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from connector_core.domain.models import Environment, Visit
from connector_core.domain.presence import ParticipantRecord
from connector_core.domain.reports import (
    CSV_COLUMNS,
    MAX_REPORT_DAYS,
    TotalsBuilder,
    VisitSummary,
    clean_department_id,
    summarize,
)
from connector_core.errors import (
    ConnectorError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    from connector_core.bootstrap import Container
    from connector_core.service.portal_models import Caller

__all__ = [
    "ReportQuery",
    "authorize",
    "csv_chunks",
    "csv_filename",
    "csv_rows",
    "parse_query",
    "refresh_summary",
    "report_json",
    "summaries",
]

_log = get_logger("reports")
_CONFIG_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# CSV rows encoded per chunk: a few hundred KB at most in hand, whatever the range.
_CSV_CHUNK_ROWS = 500


# --- keeping summaries (the presence worker) ------------------------------------------------


def refresh_summary(
    container: Container, visit: Visit, *, participants: list[ParticipantRecord] | None = None
) -> None:
    """Recompute the visit's summary from its stored rows (read here unless the caller read
    them with the visit) and write it. A storage failure is logged and left for the visit's
    next batch: the events are already committed."""
    try:
        if participants is None:
            participants = container.visits.participants(visit)
        if not participants:
            return  # nobody ever joined: nothing to report yet
        environment: Environment | None
        try:
            environment = container.launch_cache.config_record(visit.config_id).environment
        except NotFoundError:
            environment = None  # the configuration was deleted since
        summary = summarize(visit, participants, environment=environment)
        container.reports.put(summary)
    except ConnectorError as error:
        log_event(
            _log,
            "reports.summary_failed",
            level=logging.WARNING,
            visit_key=visit.visit_key,
            error=type(error).__name__,
            status=error.extra.get("status", "-"),
        )


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportQuery:
    """A validated report request: UTC days ``first`` to ``last`` inclusive, optional filters."""

    first: date
    last: date
    config_id: str | None = None
    department_id: str | None = None


def _day(params: Mapping[str, str], name: str) -> date:
    raw = (params.get(name) or "").strip()
    if not raw:
        raise InvalidInputError(f"'{name}' is required: a UTC date, YYYY-MM-DD.", parameter=name)
    if not _DATE_RE.match(raw):
        raise InvalidInputError(f"'{name}' must be a date, YYYY-MM-DD.", parameter=name)
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidInputError(f"'{name}' is not a valid date.", parameter=name) from None


def parse_query(params: Mapping[str, str]) -> ReportQuery:
    """``from``/``to`` (inclusive, at most 366 days, ``from`` not after ``to``), ``configId``
    and ``departmentId``; ``InvalidInputError`` (400) naming what is wrong."""
    first, last = _day(params, "from"), _day(params, "to")
    if first > last:
        raise InvalidInputError("'from' is after 'to'.", parameter="from")
    if (last - first).days + 1 > MAX_REPORT_DAYS:
        raise InvalidInputError(
            f"A report covers at most {MAX_REPORT_DAYS} days; ask for a shorter range.",
            parameter="to",
        )
    config_id = params.get("configId")
    if config_id is not None and not _CONFIG_ID_RE.match(config_id):
        raise InvalidInputError("'configId' is not a configuration id.", parameter="configId")
    raw_department = params.get("departmentId")
    department = clean_department_id(raw_department)
    if raw_department is not None and (department is None or department != raw_department):
        raise InvalidInputError("'departmentId' is not a department id.", parameter="departmentId")
    return ReportQuery(first=first, last=last, config_id=config_id, department_id=department)


def authorize(caller: Caller) -> None:
    if not (caller.is_admin or caller.is_auditor):
        raise PermissionDeniedError(
            "Reports are for admins (Connector.Admin) and auditors (Connector.Auditor).",
            action="Ask your Microsoft 365 admin to assign you one of these app roles.",
        )


def summaries(container: Container, caller: Caller, query: ReportQuery) -> Iterator[VisitSummary]:
    """The caller's tenant's summaries in the range, filtered, by day (lazily, page by page)."""
    authorize(caller)
    for summary in container.reports.iter_range(caller.tenant_id, query.first, query.last):
        if query.config_id is not None and summary.config_id != query.config_id:
            continue
        if query.department_id is not None and summary.department_id != query.department_id:
            continue
        yield summary


def _iso_now(container: Container) -> str:
    now: datetime = container.clock()
    return now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def report_json(container: Container, caller: Caller, query: ReportQuery) -> dict[str, Any]:
    """The JSON body of docs/design.md: range, generation time, summary block, visits."""
    visits: list[dict[str, Any]] = []
    totals = TotalsBuilder()
    for summary in summaries(container, caller, query):
        totals.add(summary)
        visits.append(summary.wire())
    log_event(_log, "reports.read", tenant_id=caller.tenant_id, visits=len(visits), fmt="json")
    return {
        "from": query.first.isoformat(),
        "to": query.last.isoformat(),
        "generatedAt": _iso_now(container),
        "summary": totals.result().wire(),
        "visits": visits,
    }


def csv_rows(
    rows: Iterable[Sequence[str]], *, header: Sequence[str] = CSV_COLUMNS
) -> Iterator[str]:
    """RFC 4180 text, a chunk of rows at a time: CRLF line ends, fields with a comma, quote or
    line break quoted and quotes doubled; the header line first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    for count, row in enumerate(rows, start=1):
        writer.writerow(row)
        if count % _CSV_CHUNK_ROWS == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def csv_filename(query: ReportQuery) -> str:
    """The download name of the CSV report (``Content-Disposition``) for the range."""
    return f"visits-{query.first.isoformat()}-{query.last.isoformat()}.csv"


def csv_chunks(container: Container, caller: Caller, query: ReportQuery) -> Iterator[bytes]:
    """The CSV report as UTF-8 chunks, produced as the pages of summaries arrive."""
    authorize(caller)  # before the first chunk: an error must still become a 403
    count = 0

    def rows() -> Iterator[tuple[str, ...]]:
        nonlocal count
        for summary in summaries(container, caller, query):
            count += 1
            yield summary.csv_values()

    for text in csv_rows(rows()):
        yield text.encode()
    log_event(_log, "reports.read", tenant_id=caller.tenant_id, visits=count, fmt="csv")


def default_range(container: Container, days: int = 30) -> tuple[date, date]:
    """The portal's range when none is asked for: the last ``days`` UTC days, today included."""
    today: date = container.clock().astimezone(UTC).date()
    return today - timedelta(days=days - 1), today
