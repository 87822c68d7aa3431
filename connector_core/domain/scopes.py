"""OAuth scopes the connector asks EHRs for: one list per flow, shared by every area.

The launch code requests exactly these, and the portal shows the same lists to the EHR analyst
in the integration records (the scopes to grant the connector's client registration), so they
can never drift apart. SMART v1 scope syntax (``.read``/``.write``) is used because every SMART
EHR we target (Epic included) accepts it; SMART 2.x servers accept it as well.
"""

from __future__ import annotations

__all__ = [
    "BACKEND_SERVICES_SCOPES",
    "EHR_SIGNIN_SCOPES",
    "PATIENT_LAUNCH_SCOPES",
    "PROVIDER_LAUNCH_SCOPES",
    "scope_string",
]

# The approver's EHR sign-in on the portal (SMART standalone launch): identity only.
EHR_SIGNIN_SCOPES: tuple[str, ...] = ("openid", "fhirUser")

# Provider launch (SMART EHR launch from Hyperspace/Haiku/...): who the clinician is and which
# visit the launch is about. The visit (appointment, encounter, conference id) comes in the token
# response's launch context, so no FHIR read scope is needed: minimal on purpose.
PROVIDER_LAUNCH_SCOPES: tuple[str, ...] = ("launch", "openid", "fhirUser")

# Patient launch (MyChart): identity and launch context, plus reading the visit's Appointment or
# Encounter in the patient's own compartment, which tells which clinician the visit is with when
# the clinician has not started the meeting yet.
PATIENT_LAUNCH_SCOPES: tuple[str, ...] = (
    "launch",
    "openid",
    "fhirUser",
    "patient/Appointment.read",
    "patient/Encounter.read",
)

# SMART Backend Services (client credentials, private_key_jwt): presence write-back.
BACKEND_SERVICES_SCOPES: tuple[str, ...] = ("system/AuditEvent.write",)


def scope_string(scopes: tuple[str, ...]) -> str:
    """The space-separated ``scope`` parameter value."""
    return " ".join(scopes)
