"""Pure helpers for launches: FHIR references, launch context, visit keys and EHR user keys.

Raw EHR ids exist only inside the request that received them: what is stored or logged is a
keyed HMAC (``Keyring.keyed_hash``) of them, or the refs sealed for the write-back.

* visit key  = keyed_hash("visit", config id, kind, id), kind: conference > appointment > encounter
  (the order of preference of docs/design.md; group visits share a conference id);
* EHR user key = keyed_hash("ehr-user", normalized issuer, "Type/id" of ``fhirUser``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

__all__ = [
    "CONFERENCE_ID_SYSTEM",
    "LaunchContext",
    "VisitIdentifier",
    "ehr_user_key",
    "parse_reference",
    "read_launch_context",
    "visit_key",
]

# How an EHR passes a group visit's conference id: an identifier item of fhirContext.
CONFERENCE_ID_SYSTEM = "urn:ehr-virtual-visit:conference-id"

VisitKind = Literal["conference", "appointment", "encounter"]


class _Hasher(Protocol):
    def keyed_hash(self, purpose: str, *parts: str, length: int = 32) -> str: ...


@dataclass(frozen=True)
class VisitIdentifier:
    kind: VisitKind
    value: str


@dataclass(frozen=True)
class LaunchContext:
    """What a SMART token response says about the visit (raw ids: never store or log these)."""

    patient: str | None  # "Patient/id"
    encounter: str | None  # "Encounter/id"
    appointment: str | None  # "Appointment/id"
    conference_id: str | None

    def visit_identifier(self) -> VisitIdentifier | None:
        if self.conference_id:
            return VisitIdentifier("conference", self.conference_id)
        if self.appointment:
            return VisitIdentifier("appointment", self.appointment.split("/", 1)[1])
        if self.encounter:
            return VisitIdentifier("encounter", self.encounter.split("/", 1)[1])
        return None


def parse_reference(value: Any, *, expected: Sequence[str] | None = None) -> str | None:
    """``"Type/id"`` of a relative or absolute FHIR reference (``_history`` dropped), else None.

    ``expected`` restricts the resource types accepted.
    """
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
        return None
    path = urlsplit(value).path if "://" in value else value.split("?", 1)[0]
    segments = [unquote(s) for s in path.strip("/").split("/") if s]
    if len(segments) >= 4 and segments[-2] == "_history":
        segments = segments[:-2]
    if len(segments) < 2:
        return None
    rtype, rid = segments[-2], segments[-1]
    if not rtype[:1].isupper() or not rtype.isalpha() or not rid or len(rid) > 128:
        return None
    if expected is not None and rtype not in expected:
        return None
    return f"{rtype}/{rid}"


def _plain_id(value: Any, rtype: str) -> str | None:
    """A token response's ``patient``/``encounter`` is an id; tolerate a reference too."""
    if not isinstance(value, str) or not value.strip():
        return None
    if "/" in value:
        return parse_reference(value, expected=(rtype,))
    return f"{rtype}/{value.strip()}"


def read_launch_context(
    *, patient: Any, encounter: Any, fhir_context: Sequence[Mapping[str, Any]]
) -> LaunchContext:
    appointment: str | None = None
    conference: str | None = None
    encounter_ref = _plain_id(encounter, "Encounter")
    for item in fhir_context:
        identifier = item.get("identifier")
        if isinstance(identifier, Mapping) and identifier.get("system") == CONFERENCE_ID_SYSTEM:
            value = identifier.get("value")
            if isinstance(value, str) and value.strip() and conference is None:
                conference = value.strip()
            continue
        ref = parse_reference(item.get("reference"))
        if ref is None:
            continue
        if ref.startswith("Appointment/") and appointment is None:
            appointment = ref
        elif ref.startswith("Encounter/") and encounter_ref is None:
            encounter_ref = ref
    return LaunchContext(
        patient=_plain_id(patient, "Patient"),
        encounter=encounter_ref,
        appointment=appointment,
        conference_id=conference,
    )


def visit_key(hasher: _Hasher, config_id: str, identifier: VisitIdentifier) -> str:
    return hasher.keyed_hash("visit", config_id, identifier.kind, identifier.value)


def ehr_user_key(hasher: _Hasher, issuer: str, fhir_user: str) -> str:
    """Keyed hash of the EHR user: issuer (normalized FHIR base) + ``"Type/id"``."""
    return hasher.keyed_hash("ehr-user", issuer, fhir_user)
