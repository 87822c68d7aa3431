"""Per-process presence state: tunables, the webhook's subscription caches, the worker's caches.

The webhook faces unauthenticated input: anyone can POST notifications naming any subscription
id. What a request can make the connector do is bounded here:

* subscriptions the connector holds are cached (``known``, filled only from stored records,
  so nothing an attacker sends can add to it or evict from it);
* ids found to be unknown are remembered for a while (``unknown``: a bounded LRU of its own, so
  a flood of random ids only evicts other random ids);
* a request may look up only a few uncached ids in storage (``intake.MAX_LOOKUPS``); the rest
  of its unknown items are dropped and counted in one summary log line.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from connector_core.adapters.ehr_writeback import WritebackContext
    from connector_core.repositories import VisitRows
    from connector_core.service.presence.intake import GroupCommit

__all__ = [
    "BoundedLru",
    "KeptRows",
    "PresenceOptions",
    "PresenceRuntime",
    "SubscriptionInfo",
    "VisitFacts",
]

K = TypeVar("K")
V = TypeVar("V")


class BoundedLru(Generic[K, V]):
    """A thread-safe LRU with a time-to-live per entry and a fixed bound on its size: when
    full, the least recently used entry goes (never the whole cache)."""

    def __init__(self, *, max_items: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._max = max_items
        self._clock = clock
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if hit[0] <= self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: K, value: V, *, ttl: float) -> None:
        with self._lock:
            self._items[key] = (self._clock() + ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def forget(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items


@dataclass
class PresenceOptions:
    """Tunables (tests shorten them; production uses the defaults)."""

    # Delay before each retry of a write-back the EHR failed (seconds): ~44 min in all, then
    # the message is moved to the poison queue.
    retry_delays: tuple[int, ...] = (5, 30, 120, 600, 1800)
    # One worker at a time calls the EHR for a write-back; it starts a call only while its
    # lease has ``call_budget_seconds`` left (token + search + POST, each with its own timeout)
    # and renews it otherwise, so it never posts after another worker could have taken over.
    lease_seconds: int = 60
    call_budget_seconds: float = 30.0
    # Write-backs the EHR confirmed but the ledger could not record are recorded by a retry.
    ledger_retry_delay: int = 5
    subscription_cache_seconds: float = 300.0
    unknown_subscription_seconds: float = 60.0
    max_known_subscriptions: int = 50_000
    max_unknown_subscriptions: int = 10_000
    visit_facts_seconds: float = 600.0
    # A worker keeps the rows of the visits it handled (with their ETags) this long, so the
    # next batch of a visit writes without reading first; a stale row fails its ETag and is
    # read again. The visit row's call status is the one thing decided from the kept copy
    # without an ETag check, hence the short time (see ``folding.VisitBatch``).
    visit_rows_seconds: float = 10.0
    kept_rows_seconds: float = 300.0
    max_cached_visits: int = 2_000
    max_kept_writebacks: int = 512
    # A visit's report summary is refreshed this long after a batch of its events commits; the
    # batches of those seconds share one refresh (service.reports, folding.VisitBatch). Reports
    # need no fresher figures, and each refresh is a queue message, a query and a write: at 5 s
    # in the burst bench the write-back delay p50 was 5 to 7 s (1.9 s without refreshes).
    summary_delay_seconds: int = 30
    # Renew a live visit's subscription when it has less than this left, to this lifetime
    # (Graph allows meeting call event subscriptions 4230 minutes at most).
    renew_before: timedelta = timedelta(hours=1)
    subscription_lifetime: timedelta = timedelta(minutes=4200)


@dataclass(frozen=True)
class SubscriptionInfo:
    visit_key: str
    tenant_id: str
    client_state: str


@dataclass(frozen=True)
class VisitFacts:
    """What the worker derives from a visit once (it never changes for a visit): the hashed
    organizer key that tells the clinician apart, and the unsealed EHR references."""

    clinician_user_key: str | None
    context: WritebackContext


@dataclass(frozen=True)
class KeptRows:
    """A visit's rows as this worker last read or wrote them (each with its ETag), and when
    the visit row itself was last read or written here (``time.monotonic``)."""

    rows: VisitRows
    visit_seen_at: float


def _group_commit() -> GroupCommit:
    from connector_core.service.presence.intake import GroupCommit

    return GroupCommit()


@dataclass
class PresenceRuntime:
    """Per-process presence state (``Container.presence``)."""

    options: PresenceOptions = field(default_factory=PresenceOptions)
    group_commit: GroupCommit = field(default_factory=_group_commit)
    known: BoundedLru[str, SubscriptionInfo] = field(init=False)
    unknown: BoundedLru[str, bool] = field(init=False)
    visit_facts: BoundedLru[str, VisitFacts] = field(init=False)
    visit_rows: BoundedLru[str, KeptRows] = field(init=False)
    # Visits whose summary refresh is on the queue, with when it runs (time.monotonic).
    summary_due: BoundedLru[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.known = BoundedLru(max_items=self.options.max_known_subscriptions)
        self.unknown = BoundedLru(max_items=self.options.max_unknown_subscriptions)
        self.visit_facts = BoundedLru(max_items=20_000)
        self.visit_rows = BoundedLru(max_items=self.options.max_cached_visits)
        self.summary_due = BoundedLru(max_items=self.options.max_cached_visits)

    def remember(self, subscription_id: str, info: SubscriptionInfo) -> None:
        self.unknown.forget(subscription_id)
        self.known.put(subscription_id, info, ttl=self.options.subscription_cache_seconds)

    def remember_unknown(self, key: str) -> None:
        self.unknown.put(key, True, ttl=self.options.unknown_subscription_seconds)

    def forget(self, subscription_id: str) -> None:
        self.known.forget(subscription_id)
        self.unknown.forget(subscription_id)
