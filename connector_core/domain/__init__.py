"""Pure domain: records and the rules that change them. No I/O, no SDKs."""

from connector_core.domain.models import (
    ConfigChange,
    ConfigStatus,
    EhrUserMapping,
    EhrVendor,
    Environment,
    GraphSubscription,
    ParticipantRole,
    ParticipantState,
    ParticipantStatus,
    Region,
    TenantConfig,
    Versioned,
    Visit,
    VisitStatus,
)

__all__ = [
    "ConfigChange",
    "ConfigStatus",
    "EhrUserMapping",
    "EhrVendor",
    "Environment",
    "GraphSubscription",
    "ParticipantRole",
    "ParticipantState",
    "ParticipantStatus",
    "Region",
    "TenantConfig",
    "Versioned",
    "Visit",
    "VisitStatus",
]
