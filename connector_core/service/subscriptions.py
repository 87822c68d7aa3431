"""Graph call-event subscriptions of visits: created once per meeting, off the clinician's path.

A launch that creates a meeting only puts a message on the ``meeting-subscriptions`` queue
(``request_subscription``); the queue worker (``process_subscription_message``) creates the
subscription. Graph validates the webhook before it answers a create, which takes seconds in
Microsoft Graph: the clinician does not wait for it. The worker is idempotent (a visit that has
a live subscription is left alone; two workers racing keep one subscription), retries Graph
throttling and outages with backoff (honouring ``Retry-After``), and moves a message it cannot
process to ``meeting-subscriptions-poison`` with the reason, logged.

Each subscription has its own random ``clientState``: ``"<pending id>.<secret>"``. It is stored
only sealed (``keyring.seal("client-state", {"clientState": ...})``; ``client_state_of`` opens
it), first in a *pending* record keyed by the pending id, written before Graph is asked, then in
the ``GraphSubscription`` record keyed by Graph's id. Graph may send the first notifications
before the second record exists; the webhook then finds the subscription through the pending id
in the notification's ``clientState`` (``resolve_pending``), so no event is dropped for arriving
early. Events that happen before Graph has created the subscription are not delivered by Graph
at all; the worker normally runs within a second or two, while the clinician is still on Teams'
pre-join screen.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from connector_core.crypto import random_token
from connector_core.domain.models import GraphSubscription, Visit
from connector_core.errors import (
    ConcurrencyConflictError,
    ConnectorError,
    DependencyError,
    GraphError,
    InvalidStateError,
    KeyUnavailableError,
    NotFoundError,
    UnknownKeyError,
)
from connector_core.logs import get_logger, log_event
from connector_core.queues import SUBSCRIPTION_POISON_QUEUE, SUBSCRIPTION_QUEUE

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = [
    "SUBSCRIPTION_LIFETIME",
    "SUBSCRIPTION_POISON_QUEUE",
    "SUBSCRIPTION_QUEUE",
    "PendingSubscription",
    "client_state_of",
    "create_subscription_record",
    "discard_subscription",
    "ensure_subscription",
    "process_subscription_message",
    "request_subscription",
    "resolve_pending",
    "try_create_subscription",
]

# Graph allows meeting call-event subscriptions up to 4230 minutes; stay a little under it.
SUBSCRIPTION_LIFETIME = timedelta(minutes=4200)
# Delay before each retry of a create that failed for a passing reason (seconds): ~20 minutes
# in all, then the poison queue. Graph's Retry-After wins when it asks for longer.
RETRY_DELAYS = (2, 10, 30, 120, 600)
PENDING_LIFETIME = timedelta(minutes=10)
_PENDING_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16}$")
_log = get_logger("subscriptions")


@dataclass(frozen=True)
class PendingSubscription:
    """What the webhook learns from a pending record: the visit and the clientState."""

    visit_key: str
    tenant_id: str
    client_state: str


def client_state_of(container: Container, subscription: GraphSubscription) -> str:
    """The subscription's clientState secret (for the webhook's constant-time comparison).

    ``KeyUnavailableError`` (503) when another instance sealed it with a CONNECTOR_SECRET_KEY
    key this one does not list yet (a rotation under way): the notification is genuine, so
    Graph must deliver it again rather than have it dropped."""
    try:
        payload = container.keyring.unseal("client-state", subscription.client_state_sealed)
    except UnknownKeyError as error:
        log_event(
            _log,
            "keys.unknown_key_id",
            level=logging.WARNING,
            what="client-state",
            key_id=error.extra.get("keyId", "-"),
            listed=",".join(container.keyring.key_ids),
        )
        raise KeyUnavailableError(
            "This instance does not hold the key the subscription's secret is sealed with yet "
            "(CONNECTOR_SECRET_KEY rotation in progress); deliver again."
        ) from None
    return str(payload["clientState"])


def create_subscription_record(
    container: Container, *, visit_key: str, tenant_id: str, join_web_url: str
) -> tuple[str, datetime]:
    """Create the meeting's subscription at Graph and its record. Returns ``(id, expiry)``.

    The pending record goes first, so notifications that beat the final record are accepted
    (``resolve_pending``)."""
    pending_id = random_token(12)  # 16 URL-safe characters, no "."
    client_state = f"{pending_id}.{random_token(32)}"
    sealed = container.keyring.seal("client-state", {"clientState": client_state})
    now = container.clock()
    region = container.settings.region
    container.subscriptions.put_pending(
        pending_id,
        GraphSubscription(
            subscription_id=f"pending-{pending_id}",
            region=region,
            visit_key=visit_key,
            tenant_id=tenant_id,
            client_state_sealed=sealed,
            expires_at=now + PENDING_LIFETIME,
            created_at=now,
        ),
    )
    try:
        subscription_id, expires_at = container.graph.create_subscription(
            tenant_id=tenant_id,
            join_web_url=join_web_url,
            client_state=client_state,
            expires_at=now + SUBSCRIPTION_LIFETIME,
        )
    except Exception:
        with contextlib.suppress(ConnectorError):
            container.subscriptions.delete_pending(pending_id)
        raise
    record = GraphSubscription(
        subscription_id=subscription_id,
        region=region,
        visit_key=visit_key,
        tenant_id=tenant_id,
        client_state_sealed=sealed,
        expires_at=expires_at,
        created_at=now,
    )
    try:
        container.subscriptions.upsert(record)
    except Exception:
        discard_subscription(container, tenant_id=tenant_id, subscription_id=subscription_id)
        raise
    with contextlib.suppress(ConnectorError):  # it expires anyway; the record now answers
        container.subscriptions.delete_pending(pending_id)
    log_event(_log, "subscription.created", visit_key=visit_key, subscription_id=subscription_id)
    return subscription_id, expires_at


def resolve_pending(container: Container, client_state: Any) -> PendingSubscription | None:
    """The subscription a notification's ``clientState`` names while its record is still being
    written (see the module docstring); ``None`` if it names none or does not match."""
    if not isinstance(client_state, str):
        return None
    pending_id, dot, _secret = client_state.partition(".")
    if not dot or not _PENDING_ID_RE.match(pending_id):
        return None
    try:
        record = container.subscriptions.get_pending(pending_id).record
    except NotFoundError:
        return None
    if record.expires_at <= container.clock():
        return None
    expected = client_state_of(container, record)
    if not hmac.compare_digest(client_state.encode("utf-8"), expected.encode("utf-8")):
        return None
    return PendingSubscription(record.visit_key, record.tenant_id, expected)


# --- the queue: off the clinician's path ---------------------------------------------------------


def request_subscription(
    container: Container, visit_key: str, *, reason: str, delay_seconds: int = 0, attempt: int = 0
) -> None:
    """Ask the worker to make sure ``visit_key``'s meeting has a live subscription."""
    body = json.dumps({"v": 1, "visitKey": visit_key, "attempt": attempt}, separators=(",", ":"))
    container.queue.send_message(SUBSCRIPTION_QUEUE, body, visibility_timeout=delay_seconds)
    log_event(
        _log,
        "subscription.requested",
        visit_key=visit_key,
        reason=reason,
        attempt=attempt,
        delay=delay_seconds,
    )


def _transient(error: ConnectorError) -> bool:
    if isinstance(error, GraphError):
        status = error.extra.get("graphStatus")
        return status is None or status in (408, 429) or int(status) >= 500
    return isinstance(error, DependencyError | ConcurrencyConflictError | InvalidStateError)


def _poison(container: Container, body: str, *, visit_key: str, reason: str) -> None:
    container.queue.send_message(SUBSCRIPTION_POISON_QUEUE, body)
    log_event(
        _log,
        "subscription.poisoned",
        level=logging.ERROR,
        visit_key=visit_key,
        reason=reason,
        queue=SUBSCRIPTION_POISON_QUEUE,
    )


def process_subscription_message(container: Container, body: str) -> None:
    """One ``meeting-subscriptions`` message (see the module docstring). Raises only when the
    retry itself cannot be queued (the Functions host then redelivers the message)."""
    try:
        data = json.loads(body)
        visit_key = str(data["visitKey"])
        attempt = int(data.get("attempt", 0))
    except (ValueError, KeyError, TypeError):
        _poison(container, body, visit_key="-", reason="malformed")
        return
    try:
        ensure_subscription(container, visit_key)
    except NotFoundError:
        log_event(_log, "subscription.visit_gone", level=logging.WARNING, visit_key=visit_key)
        return
    except ConnectorError as error:
        reason = str(error.extra.get("reason") or type(error).__name__)
        if not _transient(error):
            _poison(container, body, visit_key=visit_key, reason=reason)
            return
        if attempt >= len(RETRY_DELAYS):
            _poison(container, body, visit_key=visit_key, reason=f"retries exhausted ({reason})")
            return
        retry_after = error.extra.get("retryAfter")
        delay = RETRY_DELAYS[attempt]
        if isinstance(retry_after, int | float):
            delay = max(delay, min(int(retry_after), 3600))
        log_event(
            _log,
            "subscription.retry",
            level=logging.WARNING,
            visit_key=visit_key,
            reason=reason,
            status=error.extra.get("graphStatus", "-"),
            attempt=attempt + 1,
        )
        request_subscription(
            container, visit_key, reason="retry", delay_seconds=delay, attempt=attempt + 1
        )


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
