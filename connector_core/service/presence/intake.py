"""Webhook intake: Graph's notifications -> verified, reduced events on ``presence-events``.

For each item: the subscription is known (cached; see ``runtime``), its ``clientState`` matches
(constant time), the tenant matches; ``encryptedContent`` is decrypted (or plain
``resourceData`` read) and reduced to a ``CallEvent`` with hashed keys and no names. A bad item
is dropped and the rest go on. The events of concurrent requests leave in shared queue messages
(``GroupCommit``); a request is answered only once its events are stored.

Bounded work for unauthenticated input: a request may make at most ``MAX_LOOKUPS`` storage
reads for subscription ids nobody cached (and ``MAX_PENDING_LOOKUPS`` for pending records);
ids found unknown are remembered (a bounded LRU apart from the known ones); the first
``MAX_DROP_LOGS`` dropped items are logged one by one, the rest in one summary line. Once an
item of the request has proven itself (its ``clientState`` matched a stored secret, which only
Graph can send), the request is Graph's and may look up to ``MAX_LOOKUPS_VERIFIED`` ids: a cold
instance receiving a batch for many subscriptions does not drop genuine events.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connector_core.domain.presence import ci_get, parse_call_event
from connector_core.errors import (
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    StorageUnavailableError,
)
from connector_core.logs import get_logger, log_event
from connector_core.queues import PRESENCE_QUEUE
from connector_core.service.presence.messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ITEMS,
    PresenceMessage,
)
from connector_core.service.presence.runtime import SubscriptionInfo

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = [
    "LIFECYCLE_EVENTS",
    "MAX_DROP_LOGS",
    "MAX_LOOKUPS",
    "MAX_LOOKUPS_VERIFIED",
    "MAX_NOTIFICATION_ITEMS",
    "MAX_PENDING_LOOKUPS",
    "AcceptResult",
    "GroupCommit",
    "accept_notifications",
    "lookup_subscription",
]

LIFECYCLE_EVENTS = frozenset({"reauthorizationRequired", "subscriptionRemoved", "missed"})
MAX_NOTIFICATION_ITEMS = 1000
# Storage reads a request may cause for subscription ids no cache knows: unauthenticated input
# must not buy unbounded storage work (nor evict anything: see ``runtime``).
MAX_LOOKUPS = 4
# Unknown subscription ids whose clientState names a pending subscription: at most this many
# pending-record reads per request.
MAX_PENDING_LOOKUPS = 4
# Once an item of the request has proven to come from Graph (its clientState matched).
MAX_LOOKUPS_VERIFIED = 64
MAX_DROP_LOGS = 3
# A request's events are stored within this, or it answers 503 and Graph delivers them again:
# Graph wants an answer within 3 s and slows down, then drops, notifications to an endpoint that
# keeps answering late. A send that lands after the 503 only duplicates events, which the worker
# folds away (at least once, like Graph itself). The storage client's own timeouts are longer.
ACK_DEADLINE_SECONDS = 2.5
# Sends in flight at once: one at a time makes every request wait a whole storage round trip
# behind the previous batch; a few in parallel keep batches large and waits short.
MAX_INFLIGHT_SENDS = 2
# Under load (other requests on their way, being verified and decrypted, or a send started
# within LOAD_WINDOW), a batch waits up to LINGER for company: a queue message per event costs
# the worker (and the queue service) as much as the event itself, and a few milliseconds are
# cheap against Graph's 3 s. A request after a quiet moment, with nobody on the way, never waits.
LINGER_SECONDS = 0.010
LOAD_WINDOW_SECONDS = 0.050
LINGER_ITEMS = 16
_log = get_logger("presence")


# --- group commit ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    payloads: list[str]
    arrived: float = 0.0
    taken: bool = False
    done: bool = False
    error: BaseException | None = None
    # Set once its batch is stored (or failed): a request whose events are being written waits
    # on its own event, so finishing a send wakes only that batch's requests.
    finished: threading.Event = field(default_factory=threading.Event)


class GroupCommit:
    """Concurrent webhook requests share queue messages (group commit).

    Each request waits until its events are durably in the queue before it answers 202, and at
    most ``ACK_DEADLINE_SECONDS`` (then it fails with ``StorageUnavailableError``: 503). Up to
    ``MAX_INFLIGHT_SENDS`` messages are being written at once, each by a sender thread (a
    stalled storage call holds that thread, never a request past its deadline); events
    arriving meanwhile accumulate and leave together in the next message. Under light load
    every batch has one request; under a burst the batches grow, so the per-event cost of the
    storage call shrinks exactly when it matters. A batch leaves as soon as a send slot is
    free, except under load (other requests on their way, ``arriving``, or a send moments ago),
    when it lingers a few milliseconds (``LINGER_SECONDS``) for more events to share it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._inflight = 0
        self._arriving = 0
        self._last_send = float("-inf")
        self._senders: ThreadPoolExecutor | None = None
        self.sends = 0  # queue messages written (for tests and the benchmark)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request whose events are on their way (being verified and decrypted): batches
        waiting to leave may wait a moment for them."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                if self._pending:
                    self._cond.notify_all()  # a batch lingering for company may go now

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = count = 0
        while self._pending:
            nxt = self._pending[0]
            extra = sum(len(p) + 1 for p in nxt.payloads)
            if batch and (
                size + extra > MAX_BATCH_BYTES or count + len(nxt.payloads) > MAX_BATCH_ITEMS
            ):
                break
            batch.append(self._pending.pop(0))
            nxt.taken = True
            size += extra
            count += len(nxt.payloads)
        return batch

    def send(self, container: Container, payloads: list[str]) -> None:
        """Return once ``payloads`` (PresenceMessage JSON) are in the queue; raise if not, or
        if that takes longer than ``ACK_DEADLINE_SECONDS``."""
        deadline = time.monotonic() + ACK_DEADLINE_SECONDS
        chunk: list[str] = []
        size = 0
        for payload in payloads:
            if chunk and (size + len(payload) > MAX_BATCH_BYTES or len(chunk) >= MAX_BATCH_ITEMS):
                self._send_chunk(container, chunk, deadline)
                chunk, size = [], 0
            chunk.append(payload)
            size += len(payload) + 1
        if chunk:
            self._send_chunk(container, chunk, deadline)

    def _start_send(self, container: Container, batch: list[_Pending]) -> None:
        """Lock held: hand ``batch`` to a sender thread. The pool's threads live as long as
        this commit (one per process; a dropped container's end when it is collected). A new
        thread per message cost more: ``Thread.start`` waits, lock held, until the thread
        runs, which at 500 notifications a second put the answers' p50 at 230 ms, not 25."""
        if self._senders is None:
            self._senders = ThreadPoolExecutor(
                max_workers=MAX_INFLIGHT_SENDS, thread_name_prefix="presence-send"
            )
        self._inflight += 1
        self._senders.submit(self._send_batch, container, batch)

    def _send_batch(self, container: Container, batch: list[_Pending]) -> None:
        """A sender thread: write one message, then tell the batch's requests."""
        error: BaseException | None = None
        try:
            items = [p for pending in batch for p in pending.payloads]
            body = items[0] if len(items) == 1 else '{"v":1,"items":[' + ",".join(items) + "]}"
            container.queue.send_message(PRESENCE_QUEUE, body)
        except BaseException as exc:  # reported to every request of the batch still waiting
            error = exc
        finally:
            with self._cond:
                self.sends += 1
                for pending in batch:
                    pending.done, pending.error = True, error
                    pending.finished.set()
                self._inflight -= 1
                if self._pending:
                    self._cond.notify_all()  # a send slot is free for what waits

    def _linger(self, now: float) -> float:
        """Lock held: how long the pending batch should still wait for company (0: send)."""
        if self._arriving == 0 and now - self._last_send > LOAD_WINDOW_SECONDS:
            return 0.0  # a quiet moment and nobody on the way: nothing waits
        if sum(len(p.payloads) for p in self._pending) >= LINGER_ITEMS:
            return 0.0
        return max(0.0, self._pending[0].arrived + LINGER_SECONDS - now)

    def _send_chunk(self, container: Container, payloads: list[str], deadline: float) -> None:
        mine = _Pending(payloads, arrived=time.monotonic())
        with self._cond:
            self._pending.append(mine)
            while not mine.taken:
                if self._inflight < MAX_INFLIGHT_SENDS:
                    wait = self._linger(time.monotonic())
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    self._last_send = time.monotonic()
                    self._start_send(container, self._take())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    with contextlib.suppress(ValueError):
                        self._pending.remove(mine)
                    raise StorageUnavailableError("The event queue is too slow; retry.")
                self._cond.wait(left)  # for a free send slot
        # Taken: its batch is being written.
        if not mine.finished.wait(max(0.0, deadline - time.monotonic())):
            # It may still land: Graph's redelivery then duplicates events the worker ignores.
            raise StorageUnavailableError("The event queue did not confirm in time; retry.")
        if mine.error is not None:
            raise mine.error


# --- subscriptions --------------------------------------------------------------------------------


def lookup_subscription(container: Container, subscription_id: str) -> SubscriptionInfo | None:
    """The stored subscription's visit, tenant and clientState (one storage read; a known one is
    remembered; the caller remembers an unknown one once no pending record names it either)."""
    runtime = container.presence
    try:
        record = container.subscriptions.get(subscription_id).record
    except NotFoundError:
        return None
    from connector_core.service.subscriptions import client_state_of

    info = SubscriptionInfo(record.visit_key, record.tenant_id, client_state_of(container, record))
    runtime.remember(subscription_id, info)
    return info


def _lookup_pending(
    container: Container, subscription_id: str, client_state: Any
) -> SubscriptionInfo | None:
    """A subscription Graph notifies about before its record is stored, found through the
    pending id in its ``clientState`` (``subscriptions.resolve_pending``); remembered under the
    Graph id, so the next notifications take the cached path."""
    from connector_core.service.subscriptions import resolve_pending

    found = resolve_pending(container, client_state)
    if found is None:
        return None
    info = SubscriptionInfo(found.visit_key, found.tenant_id, found.client_state)
    container.presence.remember(subscription_id, info)
    log_event(_log, "presence.subscription_pending_match", visit_key=found.visit_key)
    return info


@dataclass
class _Budget:
    """What one request may still cost (storage reads) and what it dropped (for the log)."""

    lookups: int = MAX_LOOKUPS
    pending: int = MAX_PENDING_LOOKUPS
    verified: bool = False
    dropped: Counter[str] = field(default_factory=Counter)
    logged: int = 0

    def verify(self) -> None:
        if not self.verified:
            self.verified = True
            self.lookups = max(self.lookups, MAX_LOOKUPS_VERIFIED)
            self.pending = max(self.pending, MAX_LOOKUPS_VERIFIED)


class _Dropped(Exception):
    """An item not worth a storage read (the request's budget is spent, or known unknown)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _subscription_of(
    container: Container, subscription_id: str, client_state: Any, budget: _Budget
) -> SubscriptionInfo:
    runtime = container.presence
    info = runtime.known.get(subscription_id)
    if info is not None:
        return info
    if runtime.unknown.get(subscription_id):
        raise _Dropped("unknown_subscription")
    if budget.lookups <= 0:
        raise _Dropped("lookup_budget")
    budget.lookups -= 1
    info = lookup_subscription(container, subscription_id)
    if info is None and isinstance(client_state, str) and "." in client_state:
        if budget.pending <= 0:
            raise _Dropped("lookup_budget")  # not remembered: it may well be a pending one
        # Graph may notify before the subscription's record is stored (it is written right
        # after Graph answers the create): the pending record written before answers instead.
        budget.pending -= 1
        info = _lookup_pending(container, subscription_id, client_state)
    if info is None:
        # Remembered only now: a notification that arrives while its subscription's record is
        # being written (found through the pending record) must not make the next one unknown.
        runtime.remember_unknown(subscription_id)
        raise NotFoundError("The notification is for a subscription this deployment does not hold.")
    return info


def _check_item(container: Container, item: Any, budget: _Budget) -> tuple[str, SubscriptionInfo]:
    if not isinstance(item, Mapping):
        raise InvalidInputError("A notification is not an object.")
    subscription_id = item.get("subscriptionId")
    if not isinstance(subscription_id, str) or not subscription_id or len(subscription_id) > 128:
        raise InvalidInputError("A notification has no subscriptionId.")
    given = item.get("clientState")
    info = _subscription_of(container, subscription_id, given, budget)
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode("utf-8"), info.client_state.encode("utf-8")
    ):
        raise AuthenticationError("The notification's clientState does not match.")
    tenant = item.get("tenantId") or item.get("organizationId")
    if isinstance(tenant, str) and tenant and tenant.lower() != info.tenant_id.lower():
        raise AuthenticationError("The notification's tenant does not match its subscription.")
    budget.verify()
    return subscription_id, info


def _call_message(
    container: Container, item: Mapping[str, Any], budget: _Budget
) -> PresenceMessage:
    subscription_id, info = _check_item(container, item, budget)
    encrypted = item.get("encryptedContent")
    if encrypted is not None:
        resource = container.notification_crypto.decrypt(encrypted)
    else:
        resource_data = item.get("resourceData")
        if not isinstance(resource_data, Mapping) or ci_get(resource_data, "eventType") is None:
            raise InvalidInputError("The notification carries no meeting call event.")
        resource = dict(resource_data)
    keyring = container.keyring
    visit_key = info.visit_key
    event = parse_call_event(
        resource,
        participant_key=lambda pid: keyring.keyed_hash("participant", visit_key, pid),
        user_key=lambda oid: keyring.keyed_hash("participant-user", visit_key, oid),
    )
    return PresenceMessage(
        kind="call",
        id=uuid.uuid4().hex,
        subscription_id=subscription_id,
        visit_key=visit_key,
        event=event,
    )


def _lifecycle_message(
    container: Container, item: Mapping[str, Any], budget: _Budget
) -> PresenceMessage:
    subscription_id, info = _check_item(container, item, budget)
    event = item.get("lifecycleEvent")
    if event not in LIFECYCLE_EVENTS:
        raise InvalidInputError("Unknown lifecycle event.")
    return PresenceMessage(
        kind="lifecycle",
        id=uuid.uuid4().hex,
        subscription_id=subscription_id,
        visit_key=info.visit_key,
        lifecycle_event=str(event),
    )


@dataclass(frozen=True)
class AcceptResult:
    enqueued: int
    dropped: int


def _items(body: Any) -> list[Any]:
    items = body.get("value") if isinstance(body, Mapping) else None
    if not isinstance(items, list):
        raise InvalidInputError('The notification body must be {"value": [...]}.')
    if len(items) > MAX_NOTIFICATION_ITEMS:
        raise InvalidInputError(f"At most {MAX_NOTIFICATION_ITEMS} notifications per request.")
    return items


def _drop(budget: _Budget, index: int, item: Any, reason: str) -> None:
    budget.dropped[reason] += 1
    if budget.logged >= MAX_DROP_LOGS:
        return  # the rest go into one summary line
    budget.logged += 1
    sub = item.get("subscriptionId") if isinstance(item, Mapping) else None
    log_event(
        _log,
        "presence.notification.dropped",
        level=logging.WARNING,
        index=index,
        reason=reason,
        subscription_id=sub[:64] if isinstance(sub, str) else "-",
    )


def accept_notifications(container: Container, body: Any) -> AcceptResult:
    """Verify each item and enqueue it; a bad item is dropped (and logged), the rest go on.

    Raises ``InvalidInputError`` when the body is not a notification collection and
    ``StorageUnavailableError`` when the queue cannot take the events (Graph then retries).
    """
    messages: list[PresenceMessage] = []
    budget = _Budget()
    items = _items(body)
    with container.presence.group_commit.arriving():
        for index, item in enumerate(items):
            is_lifecycle = isinstance(item, Mapping) and "lifecycleEvent" in item
            try:
                message = (
                    _lifecycle_message(container, item, budget)
                    if is_lifecycle
                    else _call_message(container, item, budget)
                )
            except _Dropped as skipped:
                _drop(budget, index, item, skipped.reason)
                continue
            except (InvalidInputError, AuthenticationError, NotFoundError) as error:
                _drop(budget, index, item, type(error).__name__)
                continue
            messages.append(message)
    if messages:
        container.presence.group_commit.send(container, [m.model_dump_json() for m in messages])
    dropped = sum(budget.dropped.values())
    if budget.logged < dropped:
        log_event(
            _log,
            "presence.notification.dropped_summary",
            level=logging.WARNING,
            dropped=dropped,
            logged=budget.logged,
            reasons=",".join(f"{r}:{n}" for r, n in sorted(budget.dropped.items())),
            enqueued=len(messages),
        )
    if _log.isEnabledFor(logging.DEBUG):
        for message in messages:
            log_event(
                _log,
                "presence.notification.enqueued",
                level=logging.DEBUG,
                message_id=message.id,
                kind=message.kind,
                visit_key=message.visit_key,
            )
    return AcceptResult(enqueued=len(messages), dropped=dropped)
