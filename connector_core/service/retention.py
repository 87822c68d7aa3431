"""The retention purge (an hourly timer): deletes what the retention rules say is past keeping.

What goes when (``connector_core.domain.retention`` holds the rules; docs/operations.md section 9
the table):

* visits, with their participant (the patient's arrival among them) and write-back ledger
  rows and their subscription record: ``CONNECTOR_RETENTION_DAYS`` after the visit ended or
  stopped being live (and not before the visit's ``purge_after``); partitions a patient opened
  and no clinician ever did (an arrival row and no visit row), as long after the patient's
  last arrival, found by scanning for arrival rows;
* Graph subscription records and pending ones: once expired (the renewal timer deletes those
  of ended visits at Graph already; the purge never calls Graph);
* nonces (single-use OAuth state) and portal sessions: once past ``ExpiresAt``;
* EHR user -> Entra mappings: ``CONNECTOR_MAPPING_RETENTION_DAYS`` after last used;
* visit summaries (reports): ``CONNECTOR_REPORT_RETENTION_DAYS`` after their day.

Configs, their audit trail and the identifier key are kept while the config (or deployment)
exists. Each kind is found by a filtered scan (rows written long enough ago, or ``ExpiresAt``
passed) of at most ``limit`` rows per run; the rest waits for the next run. Deletes are
conditional on the ETag read, so two instances running at once delete each row once and
neither fails; a row someone changed meanwhile is left for a later run. The log line carries
counts only.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING

from connector_core.domain.presence import MAX_UNSTARTED_AGE
from connector_core.domain.retention import (
    mapping_due,
    subscription_due,
    visit_due,
    visit_purge_at,
)
from connector_core.errors import ConcurrencyConflictError, ConnectorError, NotFoundError
from connector_core.logs import get_logger, log_event
from connector_core.repositories import ExpiringRows, table_name
from connector_core.service.subscriptions import SUBSCRIPTION_LIFETIME

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = ["PER_RUN", "RetentionReport", "purge_expired"]

# Rows of each kind examined per run: an hourly run keeps up with ~100 k visits a day.
PER_RUN = 500
# A subscription record unwritten this long has expired at Graph (its lifetime is shorter).
_SUBSCRIPTION_STALE = SUBSCRIPTION_LIFETIME + timedelta(hours=2)
_log = get_logger("retention")


@dataclass
class RetentionReport:
    """Counts of one run (rows this instance deleted; ``raced``: someone else changed or
    deleted them first; ``kept``: examined and not yet due)."""

    visits: int = 0
    visit_rows: int = 0
    abandoned: int = 0
    visits_kept: int = 0
    subscriptions: int = 0
    nonces: int = 0
    sessions: int = 0
    mappings: int = 0
    reports: int = 0
    raced: int = 0
    failed: int = 0

    def as_fields(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def purge_expired(container: Container, *, limit: int = PER_RUN) -> RetentionReport:
    """One run of the retention timer (see the module docstring)."""
    report = RetentionReport()
    for step in (
        _visits,
        _abandoned,
        _subscriptions,
        _nonces,
        _sessions,
        _mappings,
        _reports,
    ):
        try:
            step(container, report, limit)
        except ConnectorError as error:  # storage down, say: the other kinds still run
            report.failed += 1
            log_event(
                _log,
                "retention.step_failed",
                level=logging.WARNING,
                step=step.__name__.strip("_"),
                error=type(error).__name__,
            )
    log_event(_log, "retention.purged", **report.as_fields())
    return report


def _start() -> str:
    # Runs begin at a random partition and wrap around: a run cut short by its bound still
    # reaches every part of the table over a few runs, with no cursor to share.
    return secrets.token_hex(2)


def _retention(container: Container) -> timedelta:
    return timedelta(days=container.settings.retention_days)


def _visits(container: Container, report: RetentionReport, limit: int) -> None:
    now = container.clock()
    retention = _retention(container)
    # A visit row unwritten for the retention period is a candidate; the rule decides.
    for found in container.visits.stale(
        written_before=now - retention, limit=limit, start=_start()
    ):
        visit = found.record
        if not visit_due(visit, retention, now=now):
            # Not due yet (live, or kept until its purge_after): record when it will be, which
            # also takes it out of the candidates until then.
            report.visits_kept += 1
            due = max(visit_purge_at(visit, retention), now + timedelta(hours=1))
            try:
                container.visits.update(
                    visit.model_copy(update={"purge_after": due}), etag=found.etag
                )
            except (ConcurrencyConflictError, NotFoundError):
                report.raced += 1
            continue
        deleted = container.visits.purge(visit.visit_key, etag=found.etag)
        if deleted is None:
            report.raced += 1
            continue
        report.visits += 1
        report.visit_rows += deleted
        if visit.subscription_id:
            # Its record goes with it (idempotent); at Graph it was deleted by the renewal
            # timer when the visit ended, or has expired.
            container.subscriptions.delete(visit.subscription_id)


def _abandoned(container: Container, report: RetentionReport, limit: int) -> None:
    now = container.clock()
    written_before = now - _retention(container) - MAX_UNSTARTED_AGE
    for visit_key in container.visits.abandoned(
        written_before=written_before, limit=limit, start=_start()
    ):
        deleted = container.visits.purge_abandoned(visit_key)
        if deleted is None:
            continue  # it has a visit row (the visit's own rule applies) or just changed
        report.abandoned += 1
        report.visit_rows += deleted


def _subscriptions(container: Container, report: RetentionReport, limit: int) -> None:
    now = container.clock()
    written_before = now - max(_retention(container), _SUBSCRIPTION_STALE)
    for partition_key, found in container.subscriptions.stale(
        written_before=written_before, limit=limit, start=_start()
    ):
        if not subscription_due(found.record, now=now):
            continue
        if container.subscriptions.remove_stale(partition_key, etag=found.etag):
            report.subscriptions += 1
        else:
            report.raced += 1


def _expiring(rows: ExpiringRows, container: Container, limit: int) -> tuple[int, int]:
    deleted = raced = 0
    for partition_key, etag in rows.expired(now=container.clock(), limit=limit, start=_start()):
        if rows.remove(partition_key, etag=etag):
            deleted += 1
        else:
            raced += 1
    return deleted, raced


def _nonces(container: Container, report: RetentionReport, limit: int) -> None:
    deleted, raced = _expiring(container.nonces, container, limit)
    report.nonces += deleted
    report.raced += raced


def _sessions(container: Container, report: RetentionReport, limit: int) -> None:
    from connector_core.service.portal_web.sessions import ROW_KEY, TABLE_KIND

    rows = ExpiringRows(
        container.store, table=table_name(container.settings.region, TABLE_KIND), row_key=ROW_KEY
    )
    deleted, raced = _expiring(rows, container, limit)
    report.sessions += deleted
    report.raced += raced


def _mappings(container: Container, report: RetentionReport, limit: int) -> None:
    now = container.clock()
    period = timedelta(days=container.settings.mapping_retention_days)
    for found in container.mappings.stale(written_before=now - period, limit=limit, start=_start()):
        if not mapping_due(found.record, period, now=now):
            continue
        if container.mappings.remove(found.record.ehr_user_key, etag=found.etag):
            report.mappings += 1
            container.launch_cache.forget_mapping(found.record.ehr_user_key)
        else:
            report.raced += 1


def _reports(container: Container, report: RetentionReport, limit: int) -> None:
    day = (container.clock() - timedelta(days=container.settings.report_retention_days)).date()
    try:
        report.reports += container.reports.delete_before(day, limit=limit)
    except (ConcurrencyConflictError, NotFoundError):
        report.raced += 1  # another instance deleted the same month first; the next run ends it
