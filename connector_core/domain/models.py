"""Domain records shared by every area: tenant configs, EHR user mappings, visits, participants.

Records are immutable pydantic models; a state change returns a new record, so use cases can
compare before/after and repositories write with the ETag they read (optimistic concurrency).
The only person-related data here: the EHR user's id (kept as a keyed hash) and the Entra object
id it maps to, plus the configuring staff's UPNs that the approval workflow needs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from connector_core.errors import InvalidStateError

__all__ = [
    "APPROVAL_SIGNIN_WINDOW",
    "ConfigChange",
    "ConfigStatus",
    "EhrUserMapping",
    "EhrVendor",
    "Environment",
    "GraphSubscription",
    "ParticipantRole",
    "ParticipantState",
    "ParticipantStatus",
    "ProviderLanding",
    "Region",
    "TenantConfig",
    "Versioned",
    "Visit",
    "VisitStatus",
    "utcnow",
]

# The approver must have signed in to the EHR this recently to approve (docs/design.md, portal API).
APPROVAL_SIGNIN_WINDOW = timedelta(minutes=30)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Region(StrEnum):
    AMERICAS = "americas"
    EMEA = "emea"
    APAC = "apac"


class Environment(StrEnum):
    TEST = "test"
    PRODUCTION = "production"


class EhrVendor(StrEnum):
    EPIC = "epic"
    ORACLE = "oracle"
    SMART = "smart"


class ProviderLanding(StrEnum):
    """Where the provider launch lands: the clinician's visit page (opens the meeting and shows
    who is connected and waiting), or straight into the meeting (the behaviour before it)."""

    VISIT_PAGE = "visit-page"
    MEETING = "meeting"


class ConfigStatus(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class ConfigChange(_Record):
    """One line of a config's audit trail: who did what, when (no clinical data, ever)."""

    at: datetime
    by: str = Field(description="UPN or object id of the staff member who made the change")
    action: str = Field(description="created, updated, ehr_signin, approved")
    fields: tuple[str, ...] = Field(default=(), description="names of the fields that changed")


class TenantConfig(_Record):
    """A health system's registration of one FHIR base URL in one environment.

    Status machine::

        pending_approval --record_ehr_signin--> pending_approval (ehr_validated_at set)
        pending_approval --approve (sign-in by the approver within 30 min)--> approved
        approved | pending_approval --change--> pending_approval (sign-in and approval cleared)
    """

    id: str
    tenant_id: str
    region: Region
    fhir_base_url: str
    approver_upn: str
    # The approver's Entra object id, bound at their first sign-in as approver (tid is the
    # config's tenant): the UPN only names them, and a UPN can be given to someone else.
    approver_oid: str | None = None
    environment: Environment
    ehr_vendor: EhrVendor = EhrVendor.SMART
    smart_client_id: str | None = None
    # Stored configs written before the option existed read as the visit page (the default).
    provider_landing: ProviderLanding = ProviderLanding.VISIT_PAGE
    status: ConfigStatus = ConfigStatus.PENDING_APPROVAL
    created_at: datetime
    created_by: str
    updated_at: datetime
    ehr_validated_at: datetime | None = None
    ehr_validated_by: str | None = None
    approved_at: datetime | None = None
    approved_by: str | None = None
    # Hosts of the EHR's discovery endpoints (authorize, token, JWKS) that are not the FHIR
    # base's host, recorded when the URL was checked: the allowance the approver approved.
    ehr_endpoint_hosts: tuple[str, ...] = ()
    history: tuple[ConfigChange, ...] = ()

    def is_approver(self, upn: str | None) -> bool:
        return upn is not None and upn.casefold() == self.approver_upn.casefold()

    def approver_matches(self, *, upn: str | None, oid: str | None) -> bool:
        """The caller (same tenant) is this config's approver: by object id once bound, by UPN
        until then (the first sign-in binds it, ``bind_approver``)."""
        if self.approver_oid is not None:
            return oid is not None and oid.lower() == self.approver_oid
        return self.is_approver(upn)

    def bind_approver(self, oid: str) -> TenantConfig:
        if self.approver_oid is not None:
            return self
        return self.model_copy(update={"approver_oid": oid.lower()})

    def change(self, *, by: str, at: datetime, **updates: object) -> TenantConfig:
        """Apply an admin edit; any real change sends the config back for approval."""
        changed = tuple(sorted(k for k, v in updates.items() if getattr(self, k) != v))
        if not changed:
            return self
        if "approver_upn" in changed:
            updates = {**updates, "approver_oid": None}  # the new approver binds at sign-in
        return self.model_copy(
            update={
                **updates,
                "status": ConfigStatus.PENDING_APPROVAL,
                "ehr_validated_at": None,
                "ehr_validated_by": None,
                "approved_at": None,
                "approved_by": None,
                "updated_at": at,
                "history": (
                    *self.history,
                    ConfigChange(at=at, by=by, action="updated", fields=changed),
                ),
            }
        )

    def record_ehr_signin(self, *, by: str, at: datetime) -> TenantConfig:
        if not self.is_approver(by):
            raise InvalidStateError("Only the config's approver can complete the EHR sign-in.")
        return self.model_copy(
            update={
                "ehr_validated_at": at,
                "ehr_validated_by": by,
                "updated_at": at,
                "history": (*self.history, ConfigChange(at=at, by=by, action="ehr_signin")),
            }
        )

    def approve(self, *, by: str, at: datetime) -> TenantConfig:
        if not self.is_approver(by):
            raise InvalidStateError("Only the config's approver can approve it.")
        if self.status is ConfigStatus.APPROVED:
            return self
        signed_in = self.ehr_validated_at
        if (
            signed_in is None
            or self.ehr_validated_by is None
            or not self.is_approver(self.ehr_validated_by)
            or at - signed_in > APPROVAL_SIGNIN_WINDOW
        ):
            raise InvalidStateError(
                "Sign in to the EHR first (POST /api/configs/{id}/ehr-signin); approval needs a "
                "successful EHR sign-in by the approver within the last 30 minutes."
            )
        return self.model_copy(
            update={
                "status": ConfigStatus.APPROVED,
                "approved_at": at,
                "approved_by": by,
                "updated_at": at,
                "history": (*self.history, ConfigChange(at=at, by=by, action="approved")),
            }
        )


class EhrUserMapping(_Record):
    """EHR user -> Entra user. ``ehr_user_key`` is a keyed hash of issuer + fhirUser, never raw."""

    ehr_user_key: str
    region: Region
    tenant_id: str
    entra_oid: str
    entra_tid: str
    created_at: datetime
    last_used_at: datetime


class VisitStatus(StrEnum):
    SCHEDULED = "scheduled"
    LIVE = "live"
    ENDED = "ended"


class ParticipantRole(StrEnum):
    CLINICIAN = "clinician"
    PATIENT = "patient"
    STAFF = "staff"


class ParticipantStatus(StrEnum):
    LOBBY = "lobby"
    CONNECTED = "connected"
    LEFT = "left"


class ParticipantState(_Record):
    """One participant of a visit: role and times only, never a display name."""

    participant_key: str = Field(description="keyed hash of Graph's participant id")
    role: ParticipantRole
    status: ParticipantStatus
    joined_at: datetime | None = None
    left_at: datetime | None = None
    last_event_at: datetime


class Visit(_Record):
    """The meeting of one visit, keyed by the HMAC visit key (never a raw EHR id)."""

    visit_key: str
    region: Region
    config_id: str
    tenant_id: str
    status: VisitStatus = VisitStatus.SCHEDULED
    meeting_id: str | None = None
    join_web_url: str | None = None
    organizer_oid: str | None = None
    # The launch URL's departmentId (an organisational id for reports, not patient data).
    department_id: str | None = None
    subscription_id: str | None = None
    subscription_expires_at: datetime | None = None
    sealed_context: str | None = Field(
        default=None, description="EHR references for write-back, sealed (AEAD); never in clear"
    )
    participants: tuple[ParticipantState, ...] = ()
    call_event_at: datetime | None = Field(
        default=None, description="time of the latest CallStarted/CallEnded applied (ordering)"
    )
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    purge_after: datetime | None = None


class GraphSubscription(_Record):
    """A Graph change-notification subscription for one visit's meeting call events."""

    subscription_id: str
    region: Region
    visit_key: str
    tenant_id: str
    client_state_sealed: str = Field(description="the per-subscription clientState, sealed")
    expires_at: datetime
    created_at: datetime


T = TypeVar("T", bound=BaseModel)
# Every parametrized Versioned class (Versioned[Visit], Versioned[R] in a generic repository),
# kept: pydantic caches them only weakly, so after a garbage collection the next read built the
# class again (about 0.5 ms, on half the visit reads of a launch). One per parametrization in
# the code: bounded.
_PARAMETRIZED: set[type[BaseModel]] = set()


class Versioned(BaseModel, Generic[T]):
    """A record as read from storage, with the ETag to write it back with."""

    model_config = ConfigDict(frozen=True)

    record: T
    etag: str

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _PARAMETRIZED.add(cls)
