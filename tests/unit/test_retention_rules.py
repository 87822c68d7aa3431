"""The retention rules (connector_core.domain.retention): when each record may go."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connector_core.domain.models import EhrUserMapping, Region, Visit, VisitStatus
from connector_core.domain.retention import (
    mapping_due,
    mapping_needs_touch,
    visit_due,
    visit_purge_at,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WEEK = timedelta(days=7)
DAY = timedelta(days=1)


def _visit(**fields: object) -> Visit:
    values: dict[str, object] = {
        "visit_key": "ab" * 32,
        "region": Region.AMERICAS,
        "config_id": "cfg",
        "tenant_id": "tid",
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(fields)
    return Visit.model_validate(values)


def test_an_ended_visit_goes_the_retention_period_after_it_ended() -> None:
    visit = _visit(status=VisitStatus.ENDED, ended_at=T0 + timedelta(hours=2))
    assert visit_purge_at(visit, WEEK) == T0 + timedelta(hours=2) + WEEK
    assert not visit_due(visit, WEEK, now=T0 + WEEK)
    assert visit_due(visit, WEEK, now=T0 + timedelta(hours=2) + WEEK)


def test_a_live_or_unstarted_visit_counts_from_when_it_stops_being_live() -> None:
    live = _visit(status=VisitStatus.LIVE, updated_at=T0 + DAY)
    assert visit_purge_at(live, WEEK) == T0 + DAY + DAY + WEEK
    never = _visit()
    assert visit_purge_at(never, WEEK) == T0 + DAY + WEEK
    # Still live (changed an hour ago) whatever the dates say: never due.
    recent = _visit(status=VisitStatus.LIVE, updated_at=T0 + 30 * DAY, purge_after=T0)
    assert not visit_due(recent, WEEK, now=T0 + 30 * DAY + timedelta(hours=1))


def test_purge_after_is_a_floor() -> None:
    visit = _visit(status=VisitStatus.ENDED, ended_at=T0, purge_after=T0 + 30 * DAY)
    assert visit_purge_at(visit, WEEK) == T0 + 30 * DAY


def test_a_mapping_is_touched_once_a_day_and_due_after_its_period() -> None:
    mapping = EhrUserMapping(
        ehr_user_key="k",
        region=Region.AMERICAS,
        tenant_id="tid",
        entra_oid="oid",
        entra_tid="tid",
        created_at=T0,
        last_used_at=T0,
    )
    assert not mapping_needs_touch(mapping, now=T0 + timedelta(hours=23))
    assert mapping_needs_touch(mapping, now=T0 + DAY)
    assert not mapping_due(mapping, 365 * DAY, now=T0 + 364 * DAY)
    assert mapping_due(mapping, 365 * DAY, now=T0 + 365 * DAY)
