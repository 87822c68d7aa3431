"""Retention rules: when each kind of record may be deleted (pure; the timer applies them).

* A visit (its row, participants and write-back ledger) is kept ``retention`` after its visit
  ended or expired, and never before its recorded ``purge_after``: ended -> ``ended_at``; live
  (no ``CallEnded`` came) or never started -> it stops counting as live ``MAX_UNSTARTED_AGE``
  after its last change or creation (``visit_is_live``). A live visit is never due.
* A partition with no visit row (a patient's arrival, ``domain.waiting``, written by a launch
  of a visit no clinician opened) is kept ``retention`` plus ``MAX_UNSTARTED_AGE`` after the
  arrival was last written, as an unstarted visit would be.
* A Graph subscription record (and a pending one) is kept until its expiry has passed: Graph
  no longer delivers anything for it afterwards.
* An EHR user -> Entra mapping is kept ``mapping_retention`` after it was last used
  (``last_used_at``, written on launch at most once per ``MAPPING_TOUCH_AFTER``).
* Nonces and portal sessions carry ``ExpiresAt``; past it they are dead.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from connector_core.domain.models import EhrUserMapping, GraphSubscription, Visit, VisitStatus
from connector_core.domain.presence import MAX_UNSTARTED_AGE, visit_is_live

__all__ = [
    "MAPPING_TOUCH_AFTER",
    "mapping_due",
    "mapping_needs_touch",
    "subscription_due",
    "visit_due",
    "visit_purge_at",
]

# A launch writes a mapping's ``last_used_at`` only when the stored value is older than this: a
# repeat clinician costs at most one write a day, and the timer's unit is days anyway.
MAPPING_TOUCH_AFTER = timedelta(days=1)


def visit_purge_at(visit: Visit, retention: timedelta) -> datetime:
    """When ``visit`` may be purged: ``retention`` after it ended or stopped being live, and not
    before its recorded ``purge_after``."""
    if visit.status is VisitStatus.ENDED and visit.ended_at is not None:
        over = visit.ended_at
    elif visit.status is VisitStatus.LIVE:
        over = visit.updated_at + MAX_UNSTARTED_AGE
    else:
        over = visit.created_at + MAX_UNSTARTED_AGE
    due = over + retention
    if visit.purge_after is not None:
        due = max(due, visit.purge_after)
    return due


def visit_due(visit: Visit, retention: timedelta, *, now: datetime) -> bool:
    return not visit_is_live(visit, now=now) and now >= visit_purge_at(visit, retention)


def subscription_due(subscription: GraphSubscription, *, now: datetime) -> bool:
    return subscription.expires_at <= now


def mapping_due(mapping: EhrUserMapping, period: timedelta, *, now: datetime) -> bool:
    return now - mapping.last_used_at >= period


def mapping_needs_touch(mapping: EhrUserMapping, *, now: datetime) -> bool:
    return now - mapping.last_used_at >= MAPPING_TOUCH_AFTER
