"""Write-back: the EHR calls for the ledger rows a worker has claimed (``folding`` claims them).

Exactly once at the EHR, as far as FHIR allows:

* every AuditEvent carries its write-back key as an identifier and is created conditionally
  (``If-None-Exist``), so repeating a POST whose answer was lost finds the first one (200)
  instead of making a second. An EHR whose CapabilityStatement says it honours that
  (``conditionalCreate``) is relied on: two workers posting the same write-back make one
  AuditEvent, so no lease is needed (``conditional``);
* an attempt whose outcome is unknown (a timeout, a 5xx, a worker that lost its lease) marks
  the row ``maybe_sent``; the next attempt first searches the EHR for the identifier
  (``find_audit_event``), for EHRs that ignore ``If-None-Exist``;
* a worker starts a call only while its lease has ``call_budget_seconds`` left
  (``WritebackRecord.lease_covers``; ``folding`` renews leases that run short), so no second
  worker can take a row over while a call of the first may still be under way;
* the EHR's answer and the ledger are kept apart: a storage error after the EHR confirmed a
  write-back does not count as an EHR failure (``folding`` records it later, without calling
  the EHR again).

Failures are classified for the caller: ``Failed.permanent`` (a 4xx the same request never
passes: poisoned at once), else retried through the queue with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connector_core.domain.models import EhrVendor, ParticipantRole, Visit
from connector_core.domain.presence import TransitionKind, WritebackOutcome, WritebackRecord
from connector_core.domain.scopes import BACKEND_SERVICES_SCOPES, scope_string
from connector_core.errors import (
    AuthenticationError,
    ConnectorError,
    DependencyError,
    EhrError,
    NotFoundError,
    PermissionDeniedError,
)
from connector_core.logs import get_logger, log_event
from connector_core.service.presence.runtime import VisitFacts

if TYPE_CHECKING:
    from connector_core.bootstrap import Container
    from connector_core.domain.models import TenantConfig

__all__ = ["Dropped", "Failed", "WritebackSession", "Written", "visit_facts"]

_log = get_logger("presence")


@dataclass(frozen=True)
class Written:
    record: WritebackRecord  # audit_done (and epic_done) set, outcome noted


@dataclass(frozen=True)
class Failed:
    record: WritebackRecord  # what succeeded before the failure, maybe_sent updated
    error: ConnectorError
    permanent: bool


@dataclass(frozen=True)
class Dropped:
    reason: str  # the visit's configuration is gone: nothing will ever be written


Result = Written | Failed | Dropped


def visit_facts(container: Container, visit: Visit) -> VisitFacts:
    """The clinician's hashed key and the unsealed EHR references of a visit (cached: neither
    changes for a visit)."""
    from connector_core.adapters.ehr_writeback import WritebackContext

    cache = container.presence.visit_facts
    found = cache.get(visit.visit_key)
    if found is not None:
        return found
    clinician = None
    if visit.organizer_oid:
        clinician = container.keyring.keyed_hash(
            "participant-user", visit.visit_key, visit.organizer_oid.lower()
        )
    context = WritebackContext()
    if visit.sealed_context:
        context = WritebackContext.from_payload(
            container.keyring.unseal("visit-context", visit.sealed_context)
        )
    facts = VisitFacts(clinician_user_key=clinician, context=context)
    cache.put(visit.visit_key, facts, ttl=container.presence.options.visit_facts_seconds)
    return facts


class WritebackSession:
    """The EHR calls of one visit's claimed write-backs (one config, one token, in order)."""

    def __init__(self, container: Container, visit: Visit) -> None:
        self._container = container
        self._visit = visit
        self._config: TenantConfig | None = None
        self._token: str | None = None
        self._read_token: str | None = None
        self._read_refused = False
        self._conditional: bool | None = None
        self.calls = 0  # EHR calls made (the benchmark reports them per event)

    # --- setup ---------------------------------------------------------------------------------

    def config(self) -> TenantConfig:
        """The visit's configuration (the launch's cache: one per worker, told of edits);
        ``NotFoundError`` once it is deleted."""
        if self._config is None:
            self._config = self._container.launch_cache.config_record(self._visit.config_id)
        return self._config

    def conditional(self) -> bool:
        """Whether the EHR honours ``If-None-Exist`` on AuditEvent (its CapabilityStatement,
        read once an hour): then a write-back is posted before its ledger row is written, in one
        transaction with the visit's state; else under a lease (see ``folding``)."""
        if self._conditional is None:
            try:
                base = self.config().fhir_base_url
            except NotFoundError:
                self._conditional = True  # nothing will be written: the events are dropped
            else:
                self._conditional = self._container.ehr_writer.conditional_create_supported(base)
        return self._conditional

    def _token_args(self, scopes: tuple[str, ...]) -> dict[str, Any]:
        config = self.config()
        return {
            "client_id": config.smart_client_id or self._container.settings.smart_client_id,
            "scope": scope_string(scopes),
            "allowed_hosts": config.ehr_endpoint_hosts,
        }

    def _with_token(self, call: Callable[[str], Any]) -> Any:
        """``call(token)``; a token the EHR rejects (revoked before its expiry) is replaced once,
        at once."""
        writer = self._container.ehr_writer
        base = self.config().fhir_base_url
        args = self._token_args(BACKEND_SERVICES_SCOPES)
        if self._token is None:
            self._token = writer.backend_token(base, **args)
        try:
            self.calls += 1
            return call(self._token)
        except EhrError as error:
            if error.extra.get("reason") != "token_rejected":
                raise
            log_event(_log, "presence.writeback.token_rejected", level=logging.WARNING)
            self._token = writer.backend_token(base, fresh=True, **args)
            self.calls += 1
            return call(self._token)

    def _already_there(self, record: WritebackRecord) -> bool:
        """Search the EHR for a write-back whose earlier attempt may have reached it. False when
        it cannot tell (no read scope granted, search unsupported): the conditional create
        still guards the retry."""
        if self._read_refused:
            return False
        from connector_core.adapters.ehr_writeback import RECONCILE_SCOPES

        writer = self._container.ehr_writer
        base = self.config().fhir_base_url
        try:
            if self._read_token is None:
                self._read_token = writer.backend_token(base, **self._token_args(RECONCILE_SCOPES))
            self.calls += 1
            return bool(
                writer.find_audit_event(base, token=self._read_token, writeback_key=record.key)
            )
        except (DependencyError, AuthenticationError, PermissionDeniedError) as error:
            self._read_refused = True
            log_event(
                _log,
                "presence.writeback.reconcile_unavailable",
                level=logging.WARNING,
                visit_key=record.visit_key,
                writeback=record.key,
                error=type(error).__name__,
                ehr_status=error.extra.get("ehrStatus", "-"),
            )
            return False

    # --- one write-back ------------------------------------------------------------------------

    def perform(self, record: WritebackRecord, *, site: str) -> Result:
        """Call the EHR for one claimed write-back (the AuditEvent, then Epic's status)."""
        from connector_core.adapters.ehr_writeback import build_audit_event

        container = self._container
        try:
            config = self.config()
        except NotFoundError:
            return Dropped("config_not_found")
        writer = container.ehr_writer
        base = config.fhir_base_url
        try:
            context = visit_facts(container, self._visit).context
            if not record.audit_done:
                outcome: WritebackOutcome | None = None
                if record.maybe_sent and self._already_there(record):
                    outcome = WritebackOutcome.RECONCILED
                else:
                    resource = build_audit_event(
                        transition=record.transition,
                        role=record.role,
                        participant_key=record.participant_key,
                        at=record.at,
                        context=context,
                        writeback_key=record.key,
                        site=site,
                    )
                    outcome = self._with_token(
                        lambda t: writer.post_audit_event(
                            base, resource, token=t, writeback_key=record.key
                        )
                    )
                record = record.model_copy(
                    update={"audit_done": True, "outcome": outcome, "maybe_sent": False}
                )
            if config.ehr_vendor is EhrVendor.EPIC and not record.epic_done:
                external = (
                    context.practitioner_id
                    if record.role is ParticipantRole.CLINICIAN
                    else context.patient_id
                    if record.role is ParticipantRole.PATIENT
                    else None
                )
                conference = context.conference_id or context.appointment_id or context.encounter_id
                if external and conference:
                    self._with_token(
                        lambda t: writer.set_epic_connection_status(
                            base,
                            token=t,
                            conference_id=conference,
                            external_id=external,
                            external_id_type="FHIR",
                            connected=record.transition is TransitionKind.CONNECT,
                        )
                    )
                record = record.model_copy(update={"epic_done": True})
        except (
            DependencyError,
            NotFoundError,
            AuthenticationError,
            PermissionDeniedError,
        ) as error:
            sent = bool(error.extra.get("sent")) and not record.audit_done
            failed = record.model_copy(update={"maybe_sent": record.maybe_sent or sent})
            return Failed(failed, error, permanent=bool(error.extra.get("permanent")))
        return Written(record)
