"""Subscription lifecycle and renewal: Graph's lifecycle notifications and the renewal timer.

``reauthorizationRequired`` -> reauthorize (if Graph refuses, renew; if that fails, recreate);
``subscriptionRemoved`` -> recreate while the visit is live; ``missed`` -> logged (meeting call
events cannot be fetched afterwards). The timer (``renew_subscriptions``) renews live visits'
subscriptions that expire within ``renew_before`` and retires those of visits that ended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from connector_core.domain.models import GraphSubscription, Versioned, Visit
from connector_core.domain.presence import visit_is_live
from connector_core.errors import (
    ConcurrencyConflictError,
    DependencyError,
    GraphError,
    NotFoundError,
)
from connector_core.logs import get_logger, log_event
from connector_core.service.presence.messages import PresenceMessage

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = ["RenewReport", "process_lifecycle", "renew_subscriptions"]

_ETAG_RETRIES = 25
_log = get_logger("presence")


def _update_visit(container: Container, visit_key: str, change: Any) -> Versioned[Visit] | None:
    """Read-modify-write a visit with its ETag, retrying on conflicts. ``change(visit)`` returns
    the new record (or the same one for no change). None when the visit does not exist."""
    for _ in range(_ETAG_RETRIES):
        try:
            current = container.visits.get(visit_key)
        except NotFoundError:
            return None
        updated: Visit = change(current.record)
        if updated == current.record:
            return current
        try:
            etag = container.visits.update(updated, etag=current.etag)
        except ConcurrencyConflictError:
            continue
        return Versioned[Visit](record=updated, etag=etag)
    raise ConcurrencyConflictError("The visit changed too often to update; retrying later.")


def _retire(container: Container, subscription: GraphSubscription, *, reason: str) -> None:
    """Stop a subscription (visit ended or gone): delete it at Graph, forget it here."""
    try:
        container.graph.delete_subscription(
            tenant_id=subscription.tenant_id, subscription_id=subscription.subscription_id
        )
    except GraphError as error:
        log_event(
            _log,
            "presence.subscription.delete_failed",
            level=logging.WARNING,
            subscription_id=subscription.subscription_id,
            error=type(error).__name__,
        )
    container.subscriptions.delete(subscription.subscription_id)
    container.presence.forget(subscription.subscription_id)
    log_event(
        _log,
        "presence.subscription.retired",
        subscription_id=subscription.subscription_id,
        visit_key=subscription.visit_key,
        reason=reason,
    )


def _recreate(container: Container, subscription: GraphSubscription, visit: Visit) -> None:
    """Replace a removed (or expired) subscription with a new one for the same meeting."""
    from connector_core.service.subscriptions import ensure_subscription

    old_id = subscription.subscription_id
    container.presence.forget(old_id)
    ensure_subscription(container, visit.visit_key, replace_subscription_id=old_id)
    container.subscriptions.delete(old_id)  # ensure_subscription drops it too; idempotent
    log_event(
        _log,
        "presence.subscription.recreated",
        visit_key=visit.visit_key,
        old_subscription_id=old_id,
    )


def _renew(container: Container, subscription: GraphSubscription) -> datetime:
    now = container.clock()
    expires = container.graph.renew_subscription(
        tenant_id=subscription.tenant_id,
        subscription_id=subscription.subscription_id,
        expires_at=now + container.presence.options.subscription_lifetime,
    )
    container.subscriptions.upsert(subscription.model_copy(update={"expires_at": expires}))

    def note(current: Visit) -> Visit:
        if current.subscription_id != subscription.subscription_id:
            return current
        return current.model_copy(
            update={"subscription_expires_at": expires, "updated_at": container.clock()}
        )

    _update_visit(container, subscription.visit_key, note)
    log_event(
        _log,
        "presence.subscription.renewed",
        subscription_id=subscription.subscription_id,
        visit_key=subscription.visit_key,
    )
    return expires


def process_lifecycle(container: Container, message: PresenceMessage) -> None:
    """One lifecycle notification (see the module docstring)."""
    try:
        subscription = container.subscriptions.get(message.subscription_id).record
    except NotFoundError:
        log_event(
            _log,
            "presence.lifecycle.ignored",
            reason="unknown_subscription",
            subscription_id=message.subscription_id,
        )
        return
    event = message.lifecycle_event
    try:
        visit: Visit | None = container.visits.get(subscription.visit_key).record
    except NotFoundError:
        visit = None
    if visit is None or not visit_is_live(visit, now=container.clock()):
        if event != "missed":
            _retire(container, subscription, reason="visit_not_live")
        return
    if event == "missed":
        # Graph could not deliver some notifications; meeting call events cannot be fetched
        # afterwards, so the next roster update corrects the live view. Operators see this.
        log_event(
            _log,
            "presence.lifecycle.missed",
            level=logging.WARNING,
            subscription_id=subscription.subscription_id,
            visit_key=subscription.visit_key,
        )
        return
    if event == "subscriptionRemoved":
        _recreate(container, subscription, visit)
        return
    # reauthorizationRequired: reauthorize; if Graph refuses, renew; if that fails, recreate.
    try:
        container.graph.reauthorize_subscription(
            tenant_id=subscription.tenant_id, subscription_id=subscription.subscription_id
        )
        log_event(
            _log,
            "presence.subscription.reauthorized",
            subscription_id=subscription.subscription_id,
            visit_key=subscription.visit_key,
        )
        return
    except GraphError:
        pass
    try:
        _renew(container, subscription)
    except GraphError:
        _recreate(container, subscription, visit)


@dataclass(frozen=True)
class RenewReport:
    checked: int = 0
    renewed: int = 0
    retired: int = 0
    failed: int = 0


def renew_subscriptions(container: Container) -> RenewReport:
    """Timer: renew subscriptions of live visits that expire soon; retire the others."""
    now = container.clock()
    options = container.presence.options
    checked = renewed = retired = failed = 0
    for subscription_id in container.subscriptions.list_ids():
        checked += 1
        try:
            subscription = container.subscriptions.get(subscription_id).record
        except NotFoundError:
            container.subscriptions.delete(subscription_id)  # a stale index row
            continue
        try:
            try:
                visit: Visit | None = container.visits.get(subscription.visit_key).record
            except NotFoundError:
                visit = None
            if (
                visit is None
                or not visit_is_live(visit, now=now)
                or (visit.subscription_id not in (None, subscription_id))
            ):
                _retire(container, subscription, reason="visit_not_live")
                retired += 1
                continue
            if subscription.expires_at - now > options.renew_before:
                continue
            try:
                _renew(container, subscription)
            except GraphError:
                if subscription.expires_at > now:
                    raise
                _recreate(container, subscription, visit)  # expired: only a new one helps
            renewed += 1
        except (DependencyError, ConcurrencyConflictError) as error:
            failed += 1
            log_event(
                _log,
                "presence.subscription.renew_failed",
                level=logging.WARNING,
                subscription_id=subscription_id,
                error=type(error).__name__,
            )
    report = RenewReport(checked=checked, renewed=renewed, retired=retired, failed=failed)
    log_event(
        _log,
        "presence.subscriptions.checked",
        checked=checked,
        renewed=renewed,
        retired=retired,
        failed=failed,
    )
    return report
