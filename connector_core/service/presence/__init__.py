"""Presence use cases: the Graph webhook, the queue worker, lifecycle and renewal, live view.

Flow (one module each)::

    Graph --POST /api/presence--> intake.accept_notifications: clientState (constant time),
          decrypt, reduce to a CallEvent (hashed keys, no names), enqueue -> 202
          [no EHR/Graph calls; bounded storage work for unauthenticated input]
    queue presence-events --> folding.process_message, per visit and batch:
          read the visit's rows -> fold the events into participant rows and the call status,
          claim the ledger rows -> ONE entity-group transaction -> writeback: the EHR calls
          (conditional create, reconcile, lease-fenced) -> record outcomes -> retries with
          backoff, or the poison queue with the reason (devtools.replay_poison replays it)
    queue presence-events (lifecycle) / timer --> lifecycle: reauthorize, recreate, renew, retire
    GET /api/visits/{visitKey}/participants --> view: the participant rows, roles and times

Delivery is at least once everywhere (Graph, the queue, our own retries): every step is
idempotent. Storage layout: ``connector_core.repositories``. See docs/presence.md for the
reasoning.
"""

from __future__ import annotations

from connector_core.queues import PRESENCE_POISON_QUEUE as POISON_QUEUE
from connector_core.queues import PRESENCE_QUEUE
from connector_core.service.presence.folding import (
    VisitBatch,
    poison,
    poison_body,
    process_message,
)
from connector_core.service.presence.intake import (
    LIFECYCLE_EVENTS,
    MAX_LOOKUPS,
    MAX_LOOKUPS_VERIFIED,
    MAX_NOTIFICATION_ITEMS,
    MAX_PENDING_LOOKUPS,
    AcceptResult,
    GroupCommit,
    accept_notifications,
    lookup_subscription,
)
from connector_core.service.presence.lifecycle import RenewReport, renew_subscriptions
from connector_core.service.presence.messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ITEMS,
    PoisonedBody,
    PoisonNote,
    PresenceBatch,
    PresenceMessage,
)
from connector_core.service.presence.runtime import PresenceOptions, PresenceRuntime
from connector_core.service.presence.view import VISIT_COOKIE, authorize_viewer, participants_view

__all__ = [
    "LIFECYCLE_EVENTS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_LOOKUPS",
    "MAX_LOOKUPS_VERIFIED",
    "MAX_NOTIFICATION_ITEMS",
    "MAX_PENDING_LOOKUPS",
    "POISON_QUEUE",
    "PRESENCE_QUEUE",
    "VISIT_COOKIE",
    "AcceptResult",
    "GroupCommit",
    "PoisonNote",
    "PoisonedBody",
    "PresenceBatch",
    "PresenceMessage",
    "PresenceOptions",
    "PresenceRuntime",
    "RenewReport",
    "VisitBatch",
    "accept_notifications",
    "authorize_viewer",
    "lookup_subscription",
    "participants_view",
    "poison",
    "poison_body",
    "process_message",
    "renew_subscriptions",
]
