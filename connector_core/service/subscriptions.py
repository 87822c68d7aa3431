"""Graph call-event subscriptions of visits: created once per meeting, recorded for the webhook.

Each subscription has its own random ``clientState`` secret. It is stored only sealed, in the
``GraphSubscription`` record (``container.subscriptions``, keyed by the subscription id), as
``keyring.seal("client-state", {"clientState": secret})``; ``client_state_of`` opens it.

A subscription that cannot be created (Graph down, the webhook not answering its validation)
never blocks a launch: the failure is logged and the next launch of the visit tries again.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from connector_core.crypto import random_token
from connector_core.domain.models import GraphSubscription, Visit
from connector_core.errors import (
    ConcurrencyConflictError,
    ConnectorError,
    InvalidStateError,
)
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = [
    "SUBSCRIPTION_LIFETIME",
    "client_state_of",
    "create_subscription_record",
    "discard_subscription",
    "ensure_subscription",
    "try_create_subscription",
]

# Graph allows meeting call-event subscriptions up to 4230 minutes; stay a little under it.
SUBSCRIPTION_LIFETIME = timedelta(minutes=4200)
_log = get_logger("subscriptions")


def client_state_of(container: Container, subscription: GraphSubscription) -> str:
    """The subscription's clientState secret (for the webhook's constant-time comparison)."""
    payload = container.keyring.unseal("client-state", subscription.client_state_sealed)
    return str(payload["clientState"])


def create_subscription_record(
    container: Container, *, visit_key: str, tenant_id: str, join_web_url: str
) -> tuple[str, datetime]:
    """Create the meeting's subscription at Graph and its record. Returns ``(id, expiry)``."""
    secret = random_token(32)
    now = container.clock()
    subscription_id, expires_at = container.graph.create_subscription(
        tenant_id=tenant_id,
        join_web_url=join_web_url,
        client_state=secret,
        expires_at=now + SUBSCRIPTION_LIFETIME,
    )
    record = GraphSubscription(
        subscription_id=subscription_id,
        region=container.settings.region,
        visit_key=visit_key,
        tenant_id=tenant_id,
        client_state_sealed=container.keyring.seal("client-state", {"clientState": secret}),
        expires_at=expires_at,
        created_at=now,
    )
    try:
        container.subscriptions.upsert(record)
    except Exception:
        discard_subscription(container, tenant_id=tenant_id, subscription_id=subscription_id)
        raise
    log_event(_log, "subscription.created", visit_key=visit_key, subscription_id=subscription_id)
    return subscription_id, expires_at


def try_create_subscription(
    container: Container, *, visit_key: str, tenant_id: str, join_web_url: str
) -> tuple[str, datetime] | None:
    """``create_subscription_record`` that logs a failure instead of raising it."""
    try:
        return create_subscription_record(
            container, visit_key=visit_key, tenant_id=tenant_id, join_web_url=join_web_url
        )
    except ConnectorError as error:
        log_event(
            _log,
            "subscription.create_failed",
            level=logging.WARNING,
            visit_key=visit_key,
            error=type(error).__name__,
            reason=error.extra.get("reason", "-"),
            status=error.extra.get("graphStatus", "-"),
        )
        return None


def discard_subscription(container: Container, *, tenant_id: str, subscription_id: str) -> None:
    """Delete a subscription at Graph and its record; best effort (logged), never raises."""
    try:
        container.graph.delete_subscription(tenant_id=tenant_id, subscription_id=subscription_id)
    except ConnectorError as error:
        log_event(
            _log,
            "subscription.delete_failed",
            level=logging.WARNING,
            subscription_id=subscription_id,
            error=type(error).__name__,
        )
    try:
        container.subscriptions.delete(subscription_id)
    except ConnectorError:
        log_event(
            _log,
            "subscription.record_delete_failed",
            level=logging.WARNING,
            subscription_id=subscription_id,
        )


def ensure_subscription(
    container: Container, visit_key: str, *, replace_subscription_id: str | None = None
) -> None:
    """Make sure the visit's meeting has a live call-event subscription (creates it once).

    ``replace_subscription_id``: that subscription is known to be gone (Graph removed it), so a
    new one is created even though the visit still names it. Raises ``NotFoundError`` for an
    unknown visit, ``InvalidStateError`` for a visit without a meeting, and Graph errors.
    """

    def is_live(visit: Visit, now: datetime) -> bool:
        return (
            visit.subscription_id is not None
            and visit.subscription_id != replace_subscription_id
            and (visit.subscription_expires_at is None or visit.subscription_expires_at > now)
        )

    current = container.visits.get(visit_key)
    visit = current.record
    if visit.join_web_url is None:
        raise InvalidStateError("The visit has no meeting yet.")
    if is_live(visit, container.clock()):
        return
    subscription_id, expires_at = create_subscription_record(
        container, visit_key=visit_key, tenant_id=visit.tenant_id, join_web_url=visit.join_web_url
    )
    for _ in range(5):
        now = container.clock()
        updated = visit.model_copy(
            update={
                "subscription_id": subscription_id,
                "subscription_expires_at": expires_at,
                "updated_at": now,
            }
        )
        try:
            container.visits.update(updated, etag=current.etag)
        except ConcurrencyConflictError:
            # Changed meanwhile (presence, or another launch): look again.
            current = container.visits.get(visit_key)
            visit = current.record
            if is_live(visit, now):
                discard_subscription(
                    container, tenant_id=visit.tenant_id, subscription_id=subscription_id
                )
                return
            continue
        old = visit.subscription_id
        if old is not None and old != subscription_id:
            with contextlib.suppress(ConnectorError):
                container.subscriptions.delete(old)
        return
    discard_subscription(container, tenant_id=visit.tenant_id, subscription_id=subscription_id)
    raise InvalidStateError("The visit keeps changing; its subscription was not created.")
