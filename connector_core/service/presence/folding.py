"""Event folding: ``presence-events`` messages -> a visit's rows, then its write-backs.

A message (one event, or a batch of the webhook's group commit) is split by visit; each visit's
events are handled together, in event-time order (``VisitBatch``):

1. **read** the visit row, the rows of the participants the events name (all of them for a
   ``CallEnded``) and the ledger rows of the write-backs they ask for: one round trip per 14
   keys (a query filter holds 15 comparisons). A worker keeps what it read and wrote, so the
   next batch of the same visit usually needs no read (a stale row fails its ETag);
2. **fold**: the events change the participants' rows and the call status; each
   connect/disconnect gets its ledger row;
3. **write back and commit**, one of two ways (``VisitBatch``): for an EHR that honours
   ``If-None-Exist``, the EHR calls first, then the state and the ledger rows with their
   outcomes in **one entity-group transaction** per visit and batch; for any other EHR, the
   state and the ledger rows claimed under this worker's lease in one transaction, the calls,
   then the outcomes, fenced by the claim's ETags. A conflicting transaction reads and folds
   again; after the first passing EHR failure the batch's remaining calls wait for the retry;
4. **follow up**: the events that need it go back on the queue (an EHR failure: with the next
   backoff delay; a row another worker holds: when its lease ends; an EHR confirmation the
   ledger could not record: ``confirmed``), or to the poison queue with the reason.

Errors (``connector_core.errors``, mapped by the storage adapter from status and code):
storage that refuses a request for good (``StorageRejectedError``: an entity too large, ...)
poisons that visit's events at once, with the reason; passing storage errors raise, and the
Functions host retries the message (every step is idempotent; ``functions.presence`` poisons it
with the reason after the host's last try); a visit that no longer exists, or whose
configuration was deleted, drops its events with a logged reason.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from connector_core.domain.models import Versioned, Visit
from connector_core.domain.presence import (
    CallEvent,
    CallEventKind,
    ParticipantRecord,
    WritebackRecord,
    WritebackStatus,
    apply_to_visit,
    call_ended_at,
    changed_participants,
    from_legacy,
    transitions_of,
    writeback_key,
)
from connector_core.domain.waiting import PATIENT_ARRIVAL_KEY, first_admitted, lobby_start
from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    ConnectorError,
    NotFoundError,
    StorageRejectedError,
    StorageUnavailableError,
)
from connector_core.logs import correlation_id, get_logger, log_event
from connector_core.queues import PRESENCE_POISON_QUEUE, PRESENCE_QUEUE
from connector_core.repositories import (
    VISIT_ROW,
    RowWrite,
    VisitRows,
    participant_row,
    writeback_row,
)
from connector_core.service.presence.messages import (
    PoisonedBody,
    PoisonNote,
    PresenceMessage,
    pack,
    read_body,
)
from connector_core.service.presence.runtime import KeptRows
from connector_core.service.presence.writeback import (
    Dropped,
    Failed,
    Result,
    WritebackSession,
    Written,
    visit_facts,
)

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = ["VisitBatch", "poison", "poison_body", "process_message"]

_ETAG_RETRIES = 25
_log = get_logger("presence")


# --- poison ---------------------------------------------------------------------------------------


def _note(
    container: Container, reason: str, detail: str, error: ConnectorError | None = None
) -> PoisonNote:
    status = code = None
    if error is not None:
        raw_status = error.extra.get("status", error.extra.get("ehrStatus"))
        status = raw_status if isinstance(raw_status, int) else None
        raw_code = error.extra.get("code")
        code = str(raw_code) if raw_code else None
    return PoisonNote(
        reason=reason,
        detail=detail[:300],
        status=status,
        code=code,
        correlation_id=correlation_id(),
        at=container.clock(),
    )


def poison(
    container: Container,
    messages: Sequence[PresenceMessage],
    *,
    reason: str,
    detail: str,
    error: ConnectorError | None = None,
) -> None:
    """Move ``messages`` to ``presence-events-poison`` with the reason (in the message and the
    log). Operators replay them once the cause is fixed (``devtools.replay_poison``)."""
    note = _note(container, reason, detail, error)
    for body in pack(messages, poisoned=note):
        container.queue.send_message(PRESENCE_POISON_QUEUE, body)
    for message in messages:
        log_event(
            _log,
            "presence.writeback.poisoned"
            if reason.startswith("ehr") or reason.startswith("retries")
            else "presence.message.poisoned",
            level=logging.ERROR,
            visit_key=message.visit_key,
            message_id=message.id,
            reason=reason,
            status=note.status if note.status is not None else "-",
            error_code=note.code or "-",
            attempts=message.attempt,
            queue=PRESENCE_POISON_QUEUE,
        )


def poison_body(
    container: Container,
    body: str,
    *,
    reason: str,
    detail: str,
    error: ConnectorError | None = None,
) -> None:
    """Poison a whole message body (one that cannot be read, or that the host gave up on)."""
    try:
        messages = read_body(body)
    except ValueError:
        note = _note(container, reason, detail, error)
        wrapped = PoisonedBody(poisoned=note, raw=body[:30_000])
        container.queue.send_message(PRESENCE_POISON_QUEUE, wrapped.model_dump_json())
        log_event(
            _log,
            "presence.message.poisoned",
            level=logging.ERROR,
            reason=reason,
            status=note.status if note.status is not None else "-",
            error_code=note.code or "-",
            queue=PRESENCE_POISON_QUEUE,
        )
        return
    poison(container, messages, reason=reason, detail=detail, error=error)


# --- the queue ------------------------------------------------------------------------------------


def process_message(container: Container, body: str, *, dequeue_count: int = 1) -> None:
    """Handle one ``presence-events`` message. Returns normally when the message is done with
    (processed, scheduled for a retry, dropped with a reason, or moved to poison); raises for
    the host to retry it (passing storage errors)."""
    from connector_core.service.presence.lifecycle import process_lifecycle

    try:
        messages = read_body(body)
    except ValueError:
        # It can never succeed: park it where operators look, with the reason.
        poison_body(container, body, reason="malformed", detail="Not a presence-events message.")
        return
    by_visit: dict[str, list[PresenceMessage]] = {}
    summaries: set[str] = set()
    failures: list[ConnectorError] = []
    for message in messages:
        if message.kind == "summary":
            summaries.add(message.visit_key)
        elif message.kind == "lifecycle":
            try:
                process_lifecycle(container, message)
            except StorageRejectedError as error:
                poison(
                    container,
                    [message],
                    reason="storage_rejected",
                    detail=error.detail,
                    error=error,
                )
            except ConnectorError as error:
                failures.append(error)
        elif message.event is None:
            poison(container, [message], reason="malformed", detail="A call event without event.")
        else:
            by_visit.setdefault(message.visit_key, []).append(message)
    for visit_key, group in by_visit.items():
        try:
            VisitBatch(container, visit_key, group).run()
        except StorageRejectedError as error:
            log_event(
                _log,
                "presence.storage.rejected",
                level=logging.ERROR,
                visit_key=visit_key,
                status=error.extra.get("status", "-"),
                error_code=error.extra.get("code", "-"),
            )
            poison(container, group, reason="storage_rejected", detail=error.detail, error=error)
        except (StorageUnavailableError, ConcurrencyConflictError, ConflictError) as error:
            log_event(
                _log,
                "presence.storage.failed",
                level=logging.WARNING,
                visit_key=visit_key,
                error=type(error).__name__,
                status=error.extra.get("status", "-"),
                error_code=error.extra.get("code", "-"),
                dequeue_count=dequeue_count,
            )
            failures.append(error)
    for visit_key in summaries:
        _refresh_summary(container, visit_key)
    if failures:
        # The host retries the whole message; visits already done find nothing left to do.
        raise failures[0]


def _refresh_summary(container: Container, visit_key: str) -> None:
    from connector_core.service.reports import refresh_summary

    container.presence.summary_due.forget(visit_key)  # a commit from now on asks again
    try:  # one query: the visit row and its participant rows
        visit, participants = container.visits.with_participants(visit_key)
    except NotFoundError:
        return  # purged meanwhile
    except ConnectorError as error:
        log_event(
            _log,
            "reports.summary_failed",
            level=logging.WARNING,
            visit_key=visit_key,
            error=type(error).__name__,
        )
        return
    refresh_summary(container, visit, participants=participants)


# --- one visit's events ---------------------------------------------------------------------------


@dataclass
class _Claim:
    message: PresenceMessage
    record: WritebackRecord
    stored_etag: str | None  # the ledger row's ETag as read; None: it does not exist yet
    etag: str = ""  # after the claim's own write (lease mode)
    confirmed: bool = False  # the EHR confirmed it earlier; only the ledger is left


@dataclass
class _Plan:
    visit: Visit
    claims: list[_Claim] = field(default_factory=list)
    deferred: dict[str, tuple[PresenceMessage, datetime]] = field(default_factory=dict)
    state: list[RowWrite] = field(default_factory=list)  # the visit row and participant rows


@dataclass
class _Skipped:
    """Not attempted: the EHR failed an earlier call of the batch (retried with the event)."""

    record: WritebackRecord


Outcome = Result | _Skipped


def _stored(rows: VisitRows, participant_key: str) -> ParticipantRecord | None:
    found = rows.participants.get(participant_key)
    return found.record if found is not None else None


class VisitBatch:
    """One visit's events of one message: fold, write back, record (module docstring).

    Two ways, chosen by what the EHR says of itself (``WritebackSession.conditional``):

    * **conditional create** (the EHR honours ``If-None-Exist``): read, post the write-backs,
      then ONE transaction with the participants, the call status and the ledger rows with
      their outcomes. Two workers posting the same write-back make one AuditEvent at the EHR,
      so no lease is needed; a conflicting transaction reads and folds again, keeping the EHR's
      answers (nothing is posted twice by this worker);
    * **leased** (any other EHR): read, one transaction with the state and the ledger rows
      claimed under this worker's lease, the EHR calls (each only while the lease covers it,
      renewed when short; a retry of an attempt whose outcome is unknown searches the EHR
      first), then the outcomes, fenced by the ETags of the claim.
    """

    def __init__(
        self, container: Container, visit_key: str, messages: Sequence[PresenceMessage]
    ) -> None:
        self.container = container
        self.visit_key = visit_key
        self.lease_id = uuid.uuid4().hex
        self.options = container.presence.options
        self.ehr_calls = 0
        events: list[tuple[PresenceMessage, CallEvent]] = []
        for message in messages:
            assert message.event is not None
            events.append((message, message.event))
        # In event-time order (Graph may reorder; the fold is order-independent, the EHR calls
        # follow the meeting's own order).
        self.events = sorted(events, key=lambda pair: (pair[1].at, pair[0].id))
        # A batch that connects someone may admit a patient for the first time: its read also
        # asks for the patient's arrival row (same round trip), where their lobby wait began.
        self._joins = any(event.joined for _, event in self.events)
        self._arrival_read = False  # the latest read of storage asked for the arrival row

    # --- read and fold -------------------------------------------------------------------------

    def _keys(self) -> tuple[set[str], set[str], bool]:
        participants: set[str] = set()
        writebacks: set[str] = set()
        everyone = False
        for _, event in self.events:
            everyone = everyone or event.kind is CallEventKind.CALL_ENDED
            participants.update(e.participant_key for e in (*event.joined, *event.exited))
            # The key does not depend on the role: no need to know the clinician yet.
            writebacks.update(
                writeback_key(self.visit_key, t)
                for t in transitions_of(event, clinician_user_key=None)
            )
        return participants, writebacks, everyone

    def _plan(self, rows: VisitRows, now: datetime, *, leased: bool) -> _Plan:
        """The batch folded into the rows as read: the state to write, the write-backs to make
        (claimed under this worker's lease when ``leased``), the events to look at again."""
        assert rows.visit is not None
        stored = rows.visit.record
        facts = visit_facts(self.container, stored)
        participants = {k: v.record for k, v in rows.participants.items()}
        etags = {k: v.etag for k, v in rows.participants.items()}
        visit = stored
        if stored.participants:
            # Written before participants had rows: move them into rows, in this transaction.
            for legacy in stored.participants:
                participants.setdefault(legacy.participant_key, from_legacy(legacy))
            visit = stored.model_copy(update={"participants": (), "updated_at": now})
        changed: dict[str, ParticipantRecord] = {
            k: p for k, p in participants.items() if k not in etags
        }
        plan = _Plan(visit=visit)
        claimed: set[str] = set()
        lease = (
            {
                "lease_id": self.lease_id,
                "lease_until": now + timedelta(seconds=self.options.lease_seconds),
            }
            if leased
            else {}
        )
        for message, event in self.events:
            visit = apply_to_visit(visit, event, now=now)
            changed.update(
                changed_participants(
                    {**participants, **changed},
                    event,
                    clinician_user_key=facts.clinician_user_key,
                    call_ended_at=call_ended_at(visit),
                )
            )
            for transition in transitions_of(event, clinician_user_key=facts.clinician_user_key):
                key = writeback_key(self.visit_key, transition)
                if key in claimed:
                    continue  # the same event twice in one batch
                claimed.add(key)
                existing = rows.writebacks.get(key)
                if existing is not None and existing.record.finished:
                    continue  # written (or dropped) before: a duplicate delivery
                confirmed = key in message.confirmed
                if (
                    existing is not None
                    and not confirmed  # the EHR has it: only the ledger is left to write
                    and existing.record.leased_by_other(self.lease_id, now=now)
                ):
                    until = existing.record.lease_until or now
                    before = plan.deferred.get(message.id)
                    plan.deferred[message.id] = (
                        message,
                        max(until, before[1]) if before else until,
                    )
                    continue
                if existing is None:
                    record = WritebackRecord(
                        key=key,
                        visit_key=self.visit_key,
                        region=stored.region,
                        participant_key=transition.participant_key,
                        role=transition.role,
                        transition=transition.kind,
                        at=transition.at,
                        created_at=now,
                        updated_at=now,
                        **lease,
                    )
                else:
                    # Taking over a row whose lease ended: its worker may have reached the EHR.
                    took_over = existing.record.lease_id not in (None, self.lease_id)
                    record = existing.record.model_copy(
                        update={
                            "lease_id": None,
                            "lease_until": None,
                            **lease,
                            "maybe_sent": existing.record.maybe_sent or took_over,
                            "updated_at": now,
                        }
                    )
                plan.claims.append(
                    _Claim(
                        message,
                        record,
                        stored_etag=existing.etag if existing is not None else None,
                        confirmed=confirmed,
                    )
                )
        if visit != stored:
            plan.state.append(RowWrite(visit, etag=rows.visit.etag))
        plan.visit = visit
        plan.state += [RowWrite(p, etag=etags.get(k)) for k, p in changed.items()]
        return plan

    def _lobby_starts(self, plan: _Plan, rows: VisitRows) -> None:
        """A patient admitted for the first time gets the patient's arrival (their launch or
        waiting page) as the start of their lobby wait, on their own row (``domain.waiting``):
        the arrival row is overwritten by a relaunch, the patient's row keeps the figure."""
        admitted = [
            index
            for index, write in enumerate(plan.state)
            if isinstance(write.record, ParticipantRecord)
            and first_admitted(_stored(rows, write.record.participant_key), write.record)
        ]
        if not admitted:
            return
        found = rows.participants.get(PATIENT_ARRIVAL_KEY)
        arrival = found.record if found is not None else None
        if arrival is None and not self._arrival_read:
            arrival = self.container.visits.arrival(self.visit_key)  # rows came from the cache
        for index in admitted:
            write = plan.state[index]
            assert isinstance(write.record, ParticipantRecord)
            plan.state[index] = RowWrite(lobby_start(write.record, arrival), etag=write.etag)

    def _applied(self) -> None:
        for message, event in self.events:
            log_event(
                _log,
                "presence.event.applied",
                visit_key=self.visit_key,
                message_id=message.id,
                event_kind=event.kind.value,
                joined=len(event.joined),
                exited=len(event.exited),
            )

    # --- the rows this worker keeps ------------------------------------------------------------

    def _rows(
        self, participants: set[str], writebacks: set[str], everyone: bool, *, fresh: bool
    ) -> VisitRows:
        """The rows the batch needs: from what this worker kept of the visit when its visit row
        is recent (rows not kept are taken to be absent: creating one that exists fails and
        reads again), else read from storage (and kept)."""
        kept = None if fresh or everyone else self.container.presence.visit_rows.get(self.visit_key)
        if (
            kept is not None
            and kept.rows.visit is not None
            and time.monotonic() - kept.visit_seen_at < self.options.visit_rows_seconds
        ):
            self._arrival_read = False
            return VisitRows(
                visit=kept.rows.visit,
                participants={k: v for k, v in kept.rows.participants.items() if k in participants},
                writebacks={k: v for k, v in kept.rows.writebacks.items() if k in writebacks},
            )
        asked = participants | {PATIENT_ARRIVAL_KEY} if self._joins else participants
        rows = self.container.visits.read(
            self.visit_key,
            participants=asked,
            writebacks=writebacks,
            all_participants=everyone,
        )
        self._arrival_read = self._joins or everyone
        if rows.visit is not None:
            self._keep(rows, visit_seen=True)
        return rows

    def _keep(self, rows: VisitRows, *, visit_seen: bool) -> None:
        """Merge ``rows`` (read, or just written) into what this worker keeps of the visit."""
        cache = self.container.presence.visit_rows
        kept = cache.get(self.visit_key)
        participants = dict(kept.rows.participants) if kept else {}
        participants.update(rows.participants)
        writebacks = dict(kept.rows.writebacks) if kept else {}
        writebacks.update(rows.writebacks)
        while len(writebacks) > self.options.max_kept_writebacks:
            writebacks.pop(next(iter(writebacks)))
        visit = rows.visit or (kept.rows.visit if kept else None)
        if visit is None:
            return  # forgotten meanwhile (another batch met a conflict): read again next time
        seen = time.monotonic() if visit_seen or kept is None else kept.visit_seen_at
        cache.put(
            self.visit_key,
            KeptRows(VisitRows(visit, participants, writebacks), seen),
            ttl=self.options.kept_rows_seconds,
        )

    def _keep_written(self, writes: Sequence[RowWrite], etags: dict[str, str]) -> None:
        rows = VisitRows(visit=None)
        visit_written = False
        for write in writes:
            record = write.record
            if isinstance(record, Visit):
                rows.visit = Versioned[Visit](record=record, etag=etags[VISIT_ROW])
                visit_written = True
            elif isinstance(record, ParticipantRecord):
                etag = etags[participant_row(record.participant_key)]
                rows.participants[record.participant_key] = Versioned[ParticipantRecord](
                    record=record, etag=etag
                )
            else:
                rows.writebacks[record.key] = Versioned[WritebackRecord](
                    record=record, etag=etags[writeback_row(record.key)]
                )
        self._keep(rows, visit_seen=visit_written)

    def run(self) -> None:
        participants, writebacks, everyone = self._keys()
        session: WritebackSession | None = None
        known: dict[str, Outcome] = {}  # the EHR's answers of an earlier try of this batch
        fresh = False
        for _ in range(_ETAG_RETRIES):
            rows = self._rows(participants, writebacks, everyone, fresh=fresh)
            fresh = True  # after a conflict: read what storage holds
            if rows.visit is None:
                for message, _event in self.events:
                    log_event(
                        _log,
                        "presence.event.dropped",
                        level=logging.WARNING,
                        reason="visit_not_found",
                        visit_key=self.visit_key,
                        message_id=message.id,
                    )
                return
            if session is None:
                session = WritebackSession(self.container, rows.visit.record)
            conditional = session.conditional() if writebacks else True
            plan = self._plan(rows, self.container.clock(), leased=not conditional)
            self._lobby_starts(plan, rows)
            if conditional:
                results = self._call_ehr(plan, session, known=known)
                self.ehr_calls = session.calls
                now = self.container.clock()
                writes = plan.state + [
                    RowWrite(self._final(c, results[c.record.key], now), etag=c.stored_etag)
                    for c in plan.claims
                ]
                try:
                    etags = self.container.visits.commit(self.visit_key, [writes])
                except (ConcurrencyConflictError, ConflictError):
                    known.update(results)  # read and fold again; nothing is posted twice
                    self.container.presence.visit_rows.forget(self.visit_key)
                    continue
                except StorageUnavailableError as error:
                    self.container.presence.visit_rows.forget(self.visit_key)
                    self._ledger_failed(error)
                    self._follow_up(plan, results, recorded=False)
                    return
                self._keep_written(writes, etags)
                self._applied()
                self._follow_up(plan, results, recorded=True)
                self._summarize(plan)
                return
            writes = plan.state + [RowWrite(c.record, etag=c.stored_etag) for c in plan.claims]
            try:
                etags = self.container.visits.commit(self.visit_key, [writes])
            except (ConcurrencyConflictError, ConflictError):
                # another worker changed the visit's rows meanwhile: read and fold again
                self.container.presence.visit_rows.forget(self.visit_key)
                continue
            self._keep_written(writes, etags)
            for claim in plan.claims:
                claim.etag = etags[writeback_row(claim.record.key)]
            self._applied()
            results = self._call_ehr(plan, session, known={})
            self.ehr_calls = session.calls
            self._follow_up(plan, results, recorded=self._record(plan, results))
            self._summarize(plan)
            return
        raise ConcurrencyConflictError("The visit changed too often to update; retrying later.")

    def _summarize(self, plan: _Plan) -> None:
        """Schedule the visit's report summary (nothing to do when the batch changed no row).
        A ``summary`` message runs ``summary_delay_seconds`` later and reads the rows as then
        committed, so the batches of those seconds share one refresh; a batch that commits
        while one is due needs none of its own (the refresh runs after this commit)."""
        if not plan.state:
            return
        runtime = self.container.presence
        delay = runtime.options.summary_delay_seconds
        due = runtime.summary_due.get(self.visit_key)
        if due is not None and due > time.monotonic() + 0.5:
            return
        message = PresenceMessage(
            kind="summary", id=uuid.uuid4().hex, subscription_id="", visit_key=self.visit_key
        )
        try:
            self._send([message], delay=delay)
        except ConnectorError as error:  # the visit's next batch asks again
            log_event(
                _log,
                "reports.summary_not_scheduled",
                level=logging.WARNING,
                visit_key=self.visit_key,
                error=type(error).__name__,
            )
            return
        runtime.summary_due.put(self.visit_key, time.monotonic() + delay, ttl=delay)

    # --- the EHR -------------------------------------------------------------------------------

    def _renew_leases(self, claims: Sequence[_Claim]) -> list[_Claim]:
        """Extend the lease of ``claims`` (a batch whose calls outlast one lease); returns those
        still held (one another worker took over is left to it)."""
        now = self.container.clock()
        until = now + timedelta(seconds=self.options.lease_seconds)
        renewed = [
            c.record.model_copy(update={"lease_until": until, "updated_at": now}) for c in claims
        ]
        etags: dict[str, str] = {}
        try:
            etags = self.container.visits.commit(
                self.visit_key,
                [[RowWrite(r, etag=c.etag) for r, c in zip(renewed, claims, strict=True)]],
            )
        except ConcurrencyConflictError:
            for record, claim in zip(renewed, claims, strict=True):
                try:
                    etags.update(
                        self.container.visits.commit(
                            self.visit_key, [[RowWrite(record, etag=claim.etag)]]
                        )
                    )
                except ConcurrencyConflictError:
                    log_event(
                        _log,
                        "presence.writeback.lease_lost",
                        level=logging.WARNING,
                        visit_key=self.visit_key,
                        writeback=record.key,
                    )
        self.container.presence.visit_rows.forget(self.visit_key)
        held: list[_Claim] = []
        for record, claim in zip(renewed, claims, strict=True):
            etag = etags.get(writeback_row(record.key))
            if etag is not None:
                claim.record, claim.etag = record, etag
                held.append(claim)
        return held

    def _call_ehr(
        self, plan: _Plan, session: WritebackSession, *, known: dict[str, Outcome]
    ) -> dict[str, Outcome]:
        """The EHR calls of the claimed write-backs, in event order. Under a lease (claims
        carrying this worker's lease), a call starts only while the lease covers it."""
        site = self.container.settings.region.value
        results: dict[str, Outcome] = {}
        pending: list[_Claim] = []
        for claim in plan.claims:
            key = claim.record.key
            if claim.confirmed:
                results[key] = Written(
                    claim.record.model_copy(update={"audit_done": True, "epic_done": True})
                )
            elif key in known:
                results[key] = known[key]
            else:
                pending.append(claim)
        ehr_failing = False
        index = 0
        while index < len(pending):
            claim = pending[index]
            if ehr_failing:
                results[claim.record.key] = _Skipped(claim.record)
                index += 1
                continue
            if claim.record.lease_id == self.lease_id and not claim.record.lease_covers(
                self.lease_id,
                now=self.container.clock(),
                seconds=self.options.call_budget_seconds,
            ):
                pending[index:] = self._renew_leases(pending[index:])
                if index >= len(pending):
                    break
                claim = pending[index]
            result = session.perform(claim.record, site=site)
            results[claim.record.key] = result
            if isinstance(result, Failed) and not result.permanent:
                ehr_failing = True  # the rest of the batch would likely wait for timeouts too
            index += 1
        return results

    # --- ledger and queue ----------------------------------------------------------------------

    def _final(self, claim: _Claim, result: Outcome, now: datetime) -> WritebackRecord:
        done = {"lease_id": None, "lease_until": None, "updated_at": now}
        if isinstance(result, Written):
            return result.record.model_copy(
                update={
                    **done,
                    "status": WritebackStatus.DONE,
                    "attempts": claim.record.attempts + 1,
                    "last_error": None,
                    "done_at": now,
                }
            )
        if isinstance(result, Dropped):
            return claim.record.model_copy(
                update={**done, "status": WritebackStatus.DROPPED, "last_error": result.reason}
            )
        if isinstance(result, Failed):
            error = result.error
            return result.record.model_copy(
                update={
                    **done,
                    "attempts": claim.record.attempts + 1,
                    "last_error": f"{error.problem_type}:{error.extra.get('ehrStatus', '-')}",
                }
            )
        return claim.record.model_copy(update=done)  # skipped: released for the retry

    def _ledger_failed(self, error: ConnectorError) -> None:
        log_event(
            _log,
            "presence.ledger.update_failed",
            level=logging.WARNING,
            visit_key=self.visit_key,
            error=type(error).__name__,
            status=error.extra.get("status", "-"),
            error_code=error.extra.get("code", "-"),
        )

    def _record(self, plan: _Plan, results: dict[str, Outcome]) -> bool:
        """Lease mode: write the ledger rows' outcomes, fenced by the claim's ETags. False when
        storage failed (the EHR's confirmations are then carried by the retried events)."""
        now = self.container.clock()
        writes = [
            RowWrite(self._final(c, results[c.record.key], now), etag=c.etag)
            for c in plan.claims
            if c.record.key in results
        ]
        if not writes:
            return True
        try:
            self._keep_written(writes, self.container.visits.commit(self.visit_key, [writes]))
            return True
        except ConcurrencyConflictError:
            self.container.presence.visit_rows.forget(self.visit_key)
        except (StorageUnavailableError, StorageRejectedError) as error:
            self.container.presence.visit_rows.forget(self.visit_key)
            self._ledger_failed(error)
            return False
        # A row another worker took over (this worker's lease had ended): record the others.
        for write in writes:
            try:
                self._keep_written([write], self.container.visits.commit(self.visit_key, [[write]]))
            except ConcurrencyConflictError:
                assert isinstance(write.record, WritebackRecord)
                log_event(
                    _log,
                    "presence.writeback.lease_lost",
                    level=logging.WARNING,
                    visit_key=self.visit_key,
                    writeback=write.record.key,
                )
        return True

    def _send(self, messages: Sequence[PresenceMessage], *, delay: int) -> None:
        for body in pack(messages):
            self.container.queue.send_message(PRESENCE_QUEUE, body, visibility_timeout=delay)

    def _follow_up(self, plan: _Plan, results: dict[str, Outcome], *, recorded: bool) -> None:
        """Log the outcomes; send back the events that need another look, or poison them."""
        by_message: dict[str, list[tuple[_Claim, Outcome]]] = defaultdict(list)
        for claim in plan.claims:
            if claim.record.key in results:
                by_message[claim.message.id].append((claim, results[claim.record.key]))
        delays = self.options.retry_delays
        retries: dict[int, list[PresenceMessage]] = defaultdict(list)
        dropped_logged = False
        for message, _event in self.events:
            outcomes = by_message.get(message.id, [])
            for claim, result in outcomes:
                if isinstance(result, Written):
                    log_event(
                        _log,
                        "presence.writeback.done",
                        visit_key=self.visit_key,
                        writeback=claim.record.key,
                        transition=claim.record.transition.value,
                        role=claim.record.role.value,
                        outcome=result.record.outcome.value if result.record.outcome else "-",
                    )
                elif isinstance(result, Failed):
                    log_event(
                        _log,
                        "presence.writeback.failed",
                        level=logging.WARNING,
                        visit_key=self.visit_key,
                        writeback=claim.record.key,
                        error=type(result.error).__name__,
                        ehr_status=result.error.extra.get("ehrStatus", "-"),
                        maybe_sent=result.record.maybe_sent,
                    )
                elif isinstance(result, Dropped) and not dropped_logged:
                    dropped_logged = True
                    log_event(
                        _log,
                        "presence.writeback.dropped",
                        level=logging.WARNING,
                        visit_key=self.visit_key,
                        reason=result.reason,
                    )
            permanent = next(
                (r for _, r in outcomes if isinstance(r, Failed) and r.permanent), None
            )
            if permanent is not None:
                poison(
                    self.container,
                    [message],
                    reason="ehr_rejected",
                    detail=permanent.error.detail,
                    error=permanent.error,
                )
                continue
            failed = [r for _, r in outcomes if isinstance(r, Failed | _Skipped)]
            confirmed = tuple(
                c.record.key for c, r in outcomes if isinstance(r, Written) and not recorded
            )
            if failed:
                attempt = message.attempt + 1
                retry = message.model_copy(
                    update={"attempt": attempt, "confirmed": (*message.confirmed, *confirmed)}
                )
                if attempt > len(delays):
                    last = next((r for r in failed if isinstance(r, Failed)), None)
                    poison(
                        self.container,
                        [retry],
                        reason="retries_exhausted",
                        detail=last.error.detail if last else "The EHR kept failing.",
                        error=last.error if last else None,
                    )
                    continue
                retries[delays[attempt - 1]].append(retry)
                log_event(
                    _log,
                    "presence.writeback.retry_scheduled",
                    level=logging.WARNING,
                    visit_key=self.visit_key,
                    message_id=message.id,
                    attempt=attempt,
                    delay_seconds=delays[attempt - 1],
                )
            elif confirmed or not recorded:
                # The EHR has them (or nothing was asked of it); the ledger and the state are
                # left to write: the retry does that without calling the EHR again.
                retries[self.options.ledger_retry_delay].append(
                    message.model_copy(update={"confirmed": (*message.confirmed, *confirmed)})
                )
        queued = {m.id for batch in retries.values() for m in batch}
        for message, until in plan.deferred.values():
            if message.id in queued:
                continue  # already going back on the queue (its retry looks again)
            # Another worker holds a write-back of this event: look again once its lease ends,
            # so the write-back completes even if that worker dies.
            delay = max(1, int((until - self.container.clock()).total_seconds()) + 1)
            retries[delay].append(message)
        for delay, messages in sorted(retries.items()):
            self._send(messages, delay=delay)
