"""Presence use cases: the Graph webhook, the queue processor, lifecycle and renewal, live view.

Flow::

    Graph --POST /api/presence--> accept_notifications: clientState (constant time), decrypt,
          reduce to a CallEvent (hashed keys, no names), enqueue  -> 202       [no EHR/Graph calls]
    queue presence-events --> process_message:
          1. fold the event into the visit's participant state (ETag-guarded, by event time)
          2. per connect/disconnect: insert-if-absent in the write-back ledger, take its lease,
             POST AuditEvent (+ Epic status), mark done
          3. EHR failing: re-enqueue with the next backoff delay; after the last one, the message
             goes to presence-events-poison (an operator replays it: devtools.replay_poison)
    timer --> renew_subscriptions: renew live visits' subscriptions before they expire; retire
          those of visits that ended.

Delivery is at least once everywhere (Graph, the queue, our own retries): every step is
idempotent. See README "Presence and EHR write-back" for the reasoning.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from connector_core.domain.models import (
    EhrVendor,
    GraphSubscription,
    ParticipantRole,
    ParticipantStatus,
    Versioned,
    Visit,
)
from connector_core.domain.presence import (
    CallEvent,
    Transition,
    TransitionKind,
    WritebackRecord,
    WritebackStatus,
    apply_to_visit,
    ci_get,
    parse_call_event,
    transitions_of,
    visit_is_live,
    writeback_key,
)
from connector_core.domain.scopes import BACKEND_SERVICES_SCOPES, scope_string
from connector_core.errors import (
    AuthenticationError,
    ConcurrencyConflictError,
    ConflictError,
    ConnectorError,
    DependencyError,
    EhrError,
    GraphError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    StorageUnavailableError,
)
from connector_core.logs import get_logger, log_event
from connector_core.queues import PRESENCE_POISON_QUEUE as POISON_QUEUE
from connector_core.queues import PRESENCE_QUEUE
from connector_core.ttl_cache import Missing, TtlCache

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = [
    "LIFECYCLE_EVENTS",
    "POISON_QUEUE",
    "PRESENCE_QUEUE",
    "AcceptResult",
    "GroupCommit",
    "PresenceBatch",
    "PresenceMessage",
    "PresenceOptions",
    "PresenceRuntime",
    "RenewReport",
    "accept_notifications",
    "authorize_viewer",
    "clinician_user_key",
    "participants_view",
    "process_message",
    "renew_subscriptions",
]

LIFECYCLE_EVENTS = frozenset({"reauthorizationRequired", "subscriptionRemoved", "missed"})
MAX_NOTIFICATION_ITEMS = 1000
_ETAG_RETRIES = 25
_log = get_logger("presence")


@dataclass
class PresenceOptions:
    """Tunables (tests shorten them; production uses the defaults)."""

    # Delay before each retry of a write-back the EHR failed (seconds): ~44 min in all, then
    # the message is moved to the poison queue.
    retry_delays: tuple[int, ...] = (5, 30, 120, 600, 1800)
    lease_seconds: int = 60  # one worker at a time calls the EHR for a write-back
    subscription_cache_seconds: float = 300.0
    # Renew a live visit's subscription when it has less than this left, to this lifetime
    # (Graph allows meeting call event subscriptions 4230 minutes at most).
    renew_before: timedelta = timedelta(hours=1)
    subscription_lifetime: timedelta = timedelta(minutes=4200)


@dataclass(frozen=True)
class _SubscriptionInfo:
    visit_key: str
    tenant_id: str
    client_state: str


@dataclass
class PresenceRuntime:
    """Per-process presence state: options and the subscription secret cache."""

    options: PresenceOptions = field(default_factory=PresenceOptions)
    group_commit: GroupCommit = field(default_factory=lambda: GroupCommit())
    _cache: TtlCache[str, _SubscriptionInfo | None] = field(default_factory=TtlCache)

    def subscription(self, container: Container, subscription_id: str) -> _SubscriptionInfo | None:
        """The subscription's visit, tenant and clientState, cached (a few seconds for unknown
        ids, so a flood of forged ids cannot hammer storage)."""
        hit = self._cache.get(subscription_id)
        if not isinstance(hit, Missing):
            return hit
        info: _SubscriptionInfo | None
        try:
            record = container.subscriptions.get(subscription_id).record
        except NotFoundError:
            info, ttl = None, 10.0
        else:
            from connector_core.service.subscriptions import client_state_of

            secret = client_state_of(container, record)
            info = _SubscriptionInfo(record.visit_key, record.tenant_id, secret)
            ttl = self.options.subscription_cache_seconds
        self._cache.put(subscription_id, info, ttl=ttl)
        return info

    def pending(
        self, container: Container, subscription_id: str, client_state: Any
    ) -> _SubscriptionInfo | None:
        """A subscription Graph notifies about before its record is stored, found through the
        pending id in its ``clientState`` (``subscriptions.resolve_pending``); remembered under
        the Graph id, so the next notifications take the cached path."""
        from connector_core.service.subscriptions import resolve_pending

        found = resolve_pending(container, client_state)
        if found is None:
            return None
        info = _SubscriptionInfo(found.visit_key, found.tenant_id, found.client_state)
        self._cache.put(subscription_id, info, ttl=self.options.subscription_cache_seconds)
        log_event(_log, "presence.subscription_pending_match", visit_key=found.visit_key)
        return info

    def forget(self, subscription_id: str) -> None:
        self._cache.forget(subscription_id)


# --- queue message -------------------------------------------------------------------------------


class PresenceMessage(BaseModel):
    """What the webhook puts on ``presence-events``: keys, times and roles only."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    v: Literal[1] = 1
    kind: Literal["call", "lifecycle"]
    id: str  # for logs and tracing (a fresh uuid per notification item)
    subscription_id: str
    visit_key: str
    event: CallEvent | None = None
    lifecycle_event: str | None = None
    attempt: int = 0  # EHR write-back attempts that failed so far


class PresenceBatch(BaseModel):
    """One queue message carrying the events of several concurrent webhook requests."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    v: Literal[1] = 1
    items: tuple[PresenceMessage, ...]


# Storage queue messages hold 64 KiB (base64: 48 KiB of JSON); stay well inside.
MAX_BATCH_BYTES = 40 * 1024
MAX_BATCH_ITEMS = 100
_GROUP_COMMIT_TIMEOUT = 10.0


# Sends in flight at once: one at a time makes every request wait a whole storage round trip
# behind the previous batch; a few in parallel keep batches large and waits short.
MAX_INFLIGHT_SENDS = 3


@dataclass
class _Pending:
    payloads: list[str]
    taken: bool = False
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    """Concurrent webhook requests share queue messages (group commit).

    Each request waits until its events are durably in the queue before it answers 202. Up to
    ``MAX_INFLIGHT_SENDS`` messages are being written at once; events arriving meanwhile
    accumulate and leave together in the next message. Under light load every batch has one
    request; under a burst the batches grow, so the per-event cost of the storage call shrinks
    exactly when it matters. No timers: a batch leaves as soon as a send slot is free.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._inflight = 0
        self.sends = 0  # queue messages written (for tests and the benchmark)

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
        """Return once ``payloads`` (PresenceMessage JSON) are in the queue; raise if not."""
        chunk: list[str] = []
        size = 0
        for payload in payloads:
            if chunk and (size + len(payload) > MAX_BATCH_BYTES or len(chunk) >= MAX_BATCH_ITEMS):
                self._send_chunk(container, chunk)
                chunk, size = [], 0
            chunk.append(payload)
            size += len(payload) + 1
        if chunk:
            self._send_chunk(container, chunk)

    def _send_batch(self, container: Container, batch: list[_Pending]) -> None:
        """Called with the lock held; releases it around the storage call."""
        self._inflight += 1
        self._cond.release()
        error: BaseException | None = None
        try:
            items = [p for pending in batch for p in pending.payloads]
            body = items[0] if len(items) == 1 else '{"v":1,"items":[' + ",".join(items) + "]}"
            container.queue.send_message(PRESENCE_QUEUE, body)
        except BaseException as exc:  # reported to every request of the batch
            error = exc
        finally:
            self._cond.acquire()
            self.sends += 1
            for pending in batch:
                pending.done, pending.error = True, error
            self._inflight -= 1
            self._cond.notify_all()

    def _send_chunk(self, container: Container, payloads: list[str]) -> None:
        mine = _Pending(payloads)
        deadline = time.monotonic() + _GROUP_COMMIT_TIMEOUT
        with self._cond:
            self._pending.append(mine)
            while not mine.done:
                if not mine.taken and self._inflight < MAX_INFLIGHT_SENDS:
                    self._send_batch(container, self._take())
                    continue
                left = deadline - time.monotonic()
                if left <= 0 and not mine.taken:
                    with contextlib.suppress(ValueError):
                        self._pending.remove(mine)
                    raise StorageUnavailableError("The event queue is too slow; retry.")
                # A taken batch is being written: wait for its outcome (the storage client's
                # own timeouts bound that wait).
                self._cond.wait(max(left, 0.05) if not mine.taken else 1.0)
        if mine.error is not None:
            raise mine.error


# --- webhook --------------------------------------------------------------------------------------


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


# Unknown subscription ids whose clientState names a pending subscription: at most this many
# pending-record reads per request (unauthenticated input must not buy unbounded storage work).
MAX_PENDING_LOOKUPS = 4


def _check_item(
    container: Container, item: Any, budget: list[int] | None = None
) -> tuple[str, _SubscriptionInfo]:
    if not isinstance(item, Mapping):
        raise InvalidInputError("A notification is not an object.")
    subscription_id = item.get("subscriptionId")
    if not isinstance(subscription_id, str) or not subscription_id or len(subscription_id) > 128:
        raise InvalidInputError("A notification has no subscriptionId.")
    info = container.presence.subscription(container, subscription_id)
    if info is None and budget is not None and budget[0] > 0:
        # Graph may notify before the subscription's record is stored (it is written right
        # after Graph answers the create): the pending record written before answers instead.
        budget[0] -= 1
        info = container.presence.pending(container, subscription_id, item.get("clientState"))
    if info is None:
        raise NotFoundError("The notification is for a subscription this deployment does not hold.")
    given = item.get("clientState")
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode("utf-8"), info.client_state.encode("utf-8")
    ):
        raise AuthenticationError("The notification's clientState does not match.")
    tenant = item.get("tenantId") or item.get("organizationId")
    if isinstance(tenant, str) and tenant and tenant.lower() != info.tenant_id.lower():
        raise AuthenticationError("The notification's tenant does not match its subscription.")
    return subscription_id, info


def _call_message(
    container: Container, item: Mapping[str, Any], budget: list[int]
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


def _lifecycle_message(container: Container, item: Mapping[str, Any]) -> PresenceMessage:
    subscription_id, info = _check_item(container, item)
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


def accept_notifications(container: Container, body: Any) -> AcceptResult:
    """Verify each item and enqueue it; a bad item is dropped (and logged), the rest go on.

    Raises ``InvalidInputError`` when the body is not a notification collection and
    ``StorageUnavailableError`` when the queue cannot take the events (Graph then retries).
    """
    dropped = 0
    messages: list[PresenceMessage] = []
    budget = [MAX_PENDING_LOOKUPS]
    for index, item in enumerate(_items(body)):
        is_lifecycle = isinstance(item, Mapping) and "lifecycleEvent" in item
        try:
            message = (
                _lifecycle_message(container, item)
                if is_lifecycle
                else _call_message(container, item, budget)
            )
        except (InvalidInputError, AuthenticationError, NotFoundError) as error:
            dropped += 1
            sub = item.get("subscriptionId") if isinstance(item, Mapping) else None
            log_event(
                _log,
                "presence.notification.dropped",
                level=logging.WARNING,
                index=index,
                reason=type(error).__name__,
                subscription_id=sub if isinstance(sub, str) else "-",
            )
            continue
        messages.append(message)
    container.presence.group_commit.send(container, [m.model_dump_json() for m in messages])
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


# --- queue processing -----------------------------------------------------------------------------


def clinician_user_key(container: Container, visit: Visit) -> str | None:
    if not visit.organizer_oid:
        return None
    return container.keyring.keyed_hash(
        "participant-user", visit.visit_key, visit.organizer_oid.lower()
    )


def process_message(container: Container, body: str, *, dequeue_count: int = 1) -> None:
    """Handle one ``presence-events`` message. Returns normally when the message is done with
    (processed, scheduled for a retry, or moved to poison); raises for the host to retry."""
    try:
        raw = json.loads(body)
        if isinstance(raw, dict) and "items" in raw:
            messages = list(PresenceBatch.model_validate(raw).items)
        else:
            messages = [PresenceMessage.model_validate(raw)]
    except (ValidationError, ValueError):
        # It can never succeed: park it where operators look, do not drop it silently.
        container.queue.send_message(POISON_QUEUE, body)
        log_event(_log, "presence.message.malformed", level=logging.ERROR, queue=POISON_QUEUE)
        return
    # A batch is only transport: each event is processed (and retried) on its own. An error
    # here (storage) makes the host retry the whole message, which is idempotent.
    for message in messages:
        if message.kind == "lifecycle":
            _process_lifecycle(container, message)
        else:
            _process_call(container, message)


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


def _process_call(container: Container, message: PresenceMessage) -> None:
    assert message.event is not None
    event = message.event
    now = container.clock()
    holder: dict[str, str | None] = {}

    def fold(visit: Visit) -> Visit:
        key = clinician_user_key(container, visit)
        holder["clinician"] = key
        return apply_to_visit(visit, event, clinician_user_key=key, now=now)

    stored = _update_visit(container, message.visit_key, fold)
    if stored is None:
        log_event(
            _log,
            "presence.event.dropped",
            level=logging.WARNING,
            reason="visit_not_found",
            visit_key=message.visit_key,
            message_id=message.id,
        )
        return
    visit = stored.record
    log_event(
        _log,
        "presence.event.applied",
        visit_key=visit.visit_key,
        message_id=message.id,
        event_kind=event.kind.value,
        joined=len(event.joined),
        exited=len(event.exited),
    )
    transitions = transitions_of(event, clinician_user_key=holder.get("clinician"))
    if not transitions:
        return
    lease_id = uuid.uuid4().hex
    failed = 0
    wait_until: datetime | None = None
    for transition in transitions:
        outcome, until = _write_back(container, visit, transition, lease_id)
        if outcome == "failed":
            failed += 1
        elif outcome == "leased" and until is not None:
            wait_until = until if wait_until is None else max(wait_until, until)
    if failed:
        _retry_or_poison(container, message)
    elif wait_until is not None:
        # Another worker holds a write-back of this event: look again once its lease ends, so
        # the write-back completes even if that worker dies.
        delay = max(1, int((wait_until - container.clock()).total_seconds()) + 1)
        container.queue.send_message(
            PRESENCE_QUEUE, message.model_dump_json(), visibility_timeout=delay
        )


def _retry_or_poison(container: Container, message: PresenceMessage) -> None:
    delays = container.presence.options.retry_delays
    attempt = message.attempt + 1
    retry = message.model_copy(update={"attempt": attempt})
    if attempt > len(delays):
        container.queue.send_message(POISON_QUEUE, retry.model_dump_json())
        log_event(
            _log,
            "presence.writeback.poisoned",
            level=logging.ERROR,
            visit_key=message.visit_key,
            message_id=message.id,
            attempts=attempt,
            queue=POISON_QUEUE,
        )
        return
    delay = delays[attempt - 1]
    container.queue.send_message(PRESENCE_QUEUE, retry.model_dump_json(), visibility_timeout=delay)
    log_event(
        _log,
        "presence.writeback.retry_scheduled",
        level=logging.WARNING,
        visit_key=message.visit_key,
        message_id=message.id,
        attempt=attempt,
        delay_seconds=delay,
    )


Outcome = Literal["written", "done_before", "leased", "failed"]


def _write_back(
    container: Container, visit: Visit, transition: Transition, lease_id: str
) -> tuple[Outcome, datetime | None]:
    ledger = container.writebacks
    now = container.clock()
    lease_until = now + timedelta(seconds=container.presence.options.lease_seconds)
    key = writeback_key(visit.visit_key, transition)
    record = WritebackRecord(
        key=key,
        visit_key=visit.visit_key,
        region=visit.region,
        participant_key=transition.participant_key,
        role=transition.role,
        transition=transition.kind,
        at=transition.at,
        lease_id=lease_id,
        lease_until=lease_until,
        created_at=now,
        updated_at=now,
    )
    try:
        etag = ledger.create(record)
    except ConflictError:
        current = ledger.get(visit.visit_key, key)
        if current.record.status is WritebackStatus.DONE:
            return "done_before", None
        if current.record.leased_by_other(lease_id, now=now):
            return "leased", current.record.lease_until
        record = current.record.model_copy(
            update={"lease_id": lease_id, "lease_until": lease_until, "updated_at": now}
        )
        try:
            etag = ledger.update(record, etag=current.etag)
        except ConcurrencyConflictError:  # someone claimed it a moment ago
            return "leased", now + timedelta(seconds=1)
    try:
        _perform(container, visit, record, etag)
    except (DependencyError, NotFoundError, AuthenticationError, PermissionDeniedError) as error:
        log_event(
            _log,
            "presence.writeback.failed",
            level=logging.WARNING,
            visit_key=visit.visit_key,
            writeback=key,
            error=type(error).__name__,
            ehr_status=error.extra.get("ehrStatus", "-"),
        )
        return "failed", None
    return "written", None


def _perform(container: Container, visit: Visit, record: WritebackRecord, etag: str) -> None:
    """Call the EHR for one leased write-back; record progress in the ledger as it goes."""
    from connector_core.adapters.ehr_writeback import WritebackContext, build_audit_event

    ledger = container.writebacks
    try:
        # The launch's config cache: one per worker, told by the portal about edits.
        config = container.launch_cache.config_record(visit.config_id)
        context = WritebackContext()
        if visit.sealed_context:
            context = WritebackContext.from_payload(
                container.keyring.unseal("visit-context", visit.sealed_context)
            )
        writer = container.ehr_writer
        client_id = config.smart_client_id or container.settings.smart_client_id
        token_args: dict[str, Any] = {
            "client_id": client_id,
            "scope": scope_string(BACKEND_SERVICES_SCOPES),
            "allowed_hosts": config.ehr_endpoint_hosts,
        }
        token = writer.backend_token(config.fhir_base_url, **token_args)

        def with_token(call: Callable[[str], None]) -> None:
            nonlocal token
            try:
                call(token)
            except EhrError as error:
                if error.extra.get("reason") != "token_rejected":
                    raise
                # Revoked before its expiry: drop it and try once more with a fresh one.
                log_event(_log, "presence.writeback.token_rejected", level=logging.WARNING)
                token = writer.backend_token(config.fhir_base_url, fresh=True, **token_args)
                call(token)

        connected = record.transition is TransitionKind.CONNECT
        epic = config.ehr_vendor is EhrVendor.EPIC
        if not record.audit_done:
            resource = build_audit_event(
                transition=record.transition,
                role=record.role,
                participant_key=record.participant_key,
                at=record.at,
                context=context,
                writeback_key=record.key,
                site=container.settings.region.value,
            )
            with_token(lambda t: writer.post_audit_event(config.fhir_base_url, resource, token=t))
            record = record.model_copy(update={"audit_done": True, "updated_at": container.clock()})
            if epic:  # remember progress before the second call
                etag = ledger.update(record, etag=etag)
        if epic and not record.epic_done:
            external = (
                context.practitioner_id
                if record.role is ParticipantRole.CLINICIAN
                else context.patient_id
                if record.role is ParticipantRole.PATIENT
                else None
            )
            conference = context.conference_id or context.appointment_id or context.encounter_id
            if external and conference:
                with_token(
                    lambda t: writer.set_epic_connection_status(
                        config.fhir_base_url,
                        token=t,
                        conference_id=conference,
                        external_id=external,
                        external_id_type="FHIR",
                        connected=connected,
                    )
                )
            record = record.model_copy(update={"epic_done": True})
    except ConnectorError as error:
        failed = record.model_copy(
            update={
                "attempts": record.attempts + 1,
                "lease_id": None,
                "lease_until": None,
                "last_error": f"{error.problem_type}:{error.extra.get('ehrStatus', '-')}",
                "updated_at": container.clock(),
            }
        )
        with contextlib.suppress(ConcurrencyConflictError, StorageUnavailableError):
            ledger.update(failed, etag=etag)  # else the lease expires on its own
        raise
    now = container.clock()
    done = record.model_copy(
        update={
            "status": WritebackStatus.DONE,
            "attempts": record.attempts + 1,
            "lease_id": None,
            "lease_until": None,
            "last_error": None,
            "updated_at": now,
            "done_at": now,
        }
    )
    ledger.update(done, etag=etag)
    log_event(
        _log,
        "presence.writeback.done",
        visit_key=visit.visit_key,
        writeback=record.key,
        transition=record.transition.value,
        role=record.role.value,
    )


# --- lifecycle and renewal ------------------------------------------------------------------------


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


def _process_lifecycle(container: Container, message: PresenceMessage) -> None:
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


# --- live view ------------------------------------------------------------------------------------


VISIT_COOKIE = "__Host-vv-visit"


def authorize_viewer(
    container: Container, visit: Visit, *, bearer: str | None, visit_cookie: str | None
) -> None:
    """Only the visit's clinician: an Entra access token whose ``oid`` is the organizer's, or
    the visit cookie the provider launch set. ``AuthenticationError``/``PermissionDeniedError``."""
    if bearer:
        claims = container.portal_tokens.validate(bearer)
        oid = str(claims.get("oid", "")).lower()
        tid = str(claims.get("tid", "")).lower()
        if (
            not visit.organizer_oid
            or oid != visit.organizer_oid.lower()
            or tid != visit.tenant_id.lower()  # an Entra user is its tid + oid, never oid alone
        ):
            raise PermissionDeniedError("Only the visit's clinician can see who is connected.")
        return
    if visit_cookie:
        try:
            payload = container.keyring.unseal("visit-cookie", visit_cookie)
        except AuthenticationError:
            raise AuthenticationError(
                "Your visit session has expired; open the visit again from the EHR."
            ) from None
        keys = payload.get("visits") or payload.get("visit_keys") or [payload.get("visit_key")]
        if (
            isinstance(keys, list | tuple)
            and visit.visit_key in keys
            and payload.get("role", "provider") in ("provider", "clinician")
        ):
            return
        raise PermissionDeniedError("Only the visit's clinician can see who is connected.")
    raise AuthenticationError(
        "Sign in: open the visit from the EHR, or send an Entra access token.",
        action="Open the virtual visit from the EHR again.",
    )


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def participants_view(container: Container, visit: Visit) -> dict[str, Any]:
    """Who is connected now and since when (roles and times only)."""
    participants = [
        {
            "participant": p.participant_key[:12],
            "role": p.role.value,
            "status": p.status.value,
            "joinedAt": _time(p.joined_at),
            "leftAt": _time(p.left_at),
        }
        for p in visit.participants
    ]
    connected = [p for p in participants if p["status"] == ParticipantStatus.CONNECTED.value]
    waiting = any(
        p.role is ParticipantRole.PATIENT and p.status is ParticipantStatus.LOBBY
        for p in visit.participants
    )
    return {
        "visitKey": visit.visit_key,
        "callStatus": visit.status.value,
        "connected": connected,
        "participants": participants,
        "patientWaitingInLobby": waiting,
        "updatedAt": _time(visit.updated_at),
    }
