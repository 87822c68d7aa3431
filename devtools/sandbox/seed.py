"""Deterministic seed data for the sandbox SMART EHR.

Every name and identifier here is made up and deliberately distinctive, so privacy tests can scan
the connector's tables, queues and logs for them (``SENSITIVE_VALUES``). Ids are fixed; only the
appointment times move with the calendar (today, UTC), so a demo always shows "today's" visits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

__all__ = [
    "ANALYST_ID",
    "APPOINTMENTS",
    "CLINICIAN_IDS",
    "CONFERENCE_ID",
    "CONFERENCE_ID_SYSTEM",
    "ENCOUNTERS",
    "GROUP_APPOINTMENT_IDS",
    "GROUP_CO_CLINICIAN_ID",
    "INTERPRETER_ID",
    "MRN_SYSTEM",
    "PATIENTS",
    "PRACTITIONERS",
    "SENSITIVE_VALUES",
    "GroupVisitPerson",
    "SeedAppointment",
    "SeedPatient",
    "SeedPractitioner",
    "appointment_resource",
    "encounter_resource",
    "group_visit_people",
    "patient_resource",
    "practitioner_resource",
]

MRN_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
CONFERENCE_ID_SYSTEM = "urn:ehr-virtual-visit:conference-id"

PractitionerRole = Literal["clinician", "interpreter", "analyst"]


@dataclass(frozen=True)
class SeedPractitioner:
    id: str
    given: str
    family: str
    prefix: str
    role: PractitionerRole
    npi: str

    @property
    def name(self) -> str:
        return f"{self.given} {self.family}"


@dataclass(frozen=True)
class SeedPatient:
    id: str
    given: str
    family: str
    mrn: str
    birth_date: str
    gender: Literal["male", "female", "other", "unknown"]

    @property
    def name(self) -> str:
        return f"{self.given} {self.family}"


@dataclass(frozen=True)
class SeedAppointment:
    id: str
    practitioner_id: str
    patient_id: str
    start_hour: int
    start_minute: int
    minutes: int
    visit_type: str
    encounter_id: str | None = None
    conference_id: str | None = None
    other_practitioners: tuple[str, ...] = field(default_factory=tuple)  # interpreters
    co_clinicians: tuple[str, ...] = field(default_factory=tuple)  # secondary performers

    def start(self, day: date | None = None) -> datetime:
        day = day or datetime.now(UTC).date()
        return datetime.combine(day, time(self.start_hour, self.start_minute), tzinfo=UTC)

    def end(self, day: date | None = None) -> datetime:
        return self.start(day) + timedelta(minutes=self.minutes)


# --- people -------------------------------------------------------------------------------------

PRACTITIONERS: dict[str, SeedPractitioner] = {
    p.id: p
    for p in (
        SeedPractitioner(
            "prac-7f3a91c2", "Oriana", "Quillfeather", "Dr.", "clinician", "1740398216"
        ),
        SeedPractitioner(
            "prac-2b8e4d17", "Thaddeus", "Brindlecombe", "Dr.", "clinician", "1568203947"
        ),
        SeedPractitioner(
            "prac-c41d6a05", "Marisol", "Vantongeren", "Dr.", "clinician", "1093857462"
        ),
        SeedPractitioner("prac-9e05b3aa", "Ysolde", "Karamanlis", "", "interpreter", "1326649081"),
        SeedPractitioner("prac-a1d7e260", "Perpetua", "Thornwhistle", "", "analyst", "1902716354"),
    )
}
CLINICIAN_IDS: list[str] = [p.id for p in PRACTITIONERS.values() if p.role == "clinician"]
INTERPRETER_ID = "prac-9e05b3aa"
ANALYST_ID = "prac-a1d7e260"

PATIENTS: dict[str, SeedPatient] = {
    p.id: p
    for p in (
        SeedPatient(
            "pat-3c9e1f40",
            "Wilhelmina",
            "Okonkwo-Delacroix",
            "MRN-40417733",
            "1958-03-14",
            "female",
        ),
        SeedPatient(
            "pat-8d2a7b61", "Bartholomew", "Fenwick-Ashdown", "MRN-40952108", "1984-11-02", "male"
        ),
        SeedPatient(
            "pat-5e6f0c93", "Esperanza", "Lindqvist-Moreau", "MRN-41236690", "1979-07-23", "female"
        ),
        SeedPatient(
            "pat-1a4b8d27", "Casimir", "Lindqvist-Moreau", "MRN-41236714", "2011-01-30", "male"
        ),
    )
}

# --- today's schedule (times in UTC) -------------------------------------------------------------

CONFERENCE_ID = "conf-58d1e7a4"
GROUP_CO_CLINICIAN_ID = "prac-c41d6a05"  # the group visit's second clinician
GROUP_APPOINTMENT_IDS: list[str] = ["appt-d4e8b217", "appt-e2f9a6c3"]

APPOINTMENTS: dict[str, SeedAppointment] = {
    a.id: a
    for a in (
        SeedAppointment(
            "appt-6b1e0d34",
            "prac-7f3a91c2",
            "pat-3c9e1f40",
            9,
            0,
            30,
            "Video visit - follow-up",
            encounter_id="enc-4f2c8a19",
        ),
        SeedAppointment(
            "appt-0c7d5e82", "prac-2b8e4d17", "pat-8d2a7b61", 11, 0, 20, "Video visit - new patient"
        ),
        SeedAppointment(
            "appt-93af2c6b",
            "prac-c41d6a05",
            "pat-5e6f0c93",
            14,
            0,
            30,
            "Video visit - medication review",
            encounter_id="enc-b7e3190d",
        ),
        # Group visit: a family session, two appointments (two patients) sharing one
        # conference, two clinicians and an interpreter.
        SeedAppointment(
            "appt-d4e8b217",
            "prac-2b8e4d17",
            "pat-5e6f0c93",
            16,
            0,
            60,
            "Group video visit - family session",
            encounter_id="enc-2d6a9e57",
            conference_id=CONFERENCE_ID,
            other_practitioners=(INTERPRETER_ID,),
            co_clinicians=(GROUP_CO_CLINICIAN_ID,),
        ),
        SeedAppointment(
            "appt-e2f9a6c3",
            "prac-2b8e4d17",
            "pat-1a4b8d27",
            16,
            0,
            60,
            "Group video visit - family session",
            conference_id=CONFERENCE_ID,
            other_practitioners=(INTERPRETER_ID,),
            co_clinicians=(GROUP_CO_CLINICIAN_ID,),
        ),
    )
}
ENCOUNTERS: dict[str, str] = {  # encounter id -> appointment id
    a.encounter_id: a.id for a in APPOINTMENTS.values() if a.encounter_id
}


@dataclass(frozen=True)
class GroupVisitPerson:
    """Someone of the group visit and how they launch it."""

    person_id: str  # the Practitioner or Patient id
    name: str
    part: str  # their part in the visit, as the EHR page shows it
    appointment_id: str  # the appointment they launch from
    user: Literal["clinician", "patient"]
    practitioner_id: str | None  # the practitioner a staff launch is for


def group_visit_people() -> list[GroupVisitPerson]:
    """The group visit's two clinicians, interpreter and two patients (one conference)."""
    first, second = (APPOINTMENTS[a] for a in GROUP_APPOINTMENT_IDS)
    people = [
        GroupVisitPerson(
            first.practitioner_id,
            PRACTITIONERS[first.practitioner_id].name,
            "clinician (primary performer)",
            first.id,
            "clinician",
            first.practitioner_id,
        )
    ]
    for co in first.co_clinicians:
        people.append(
            GroupVisitPerson(co, PRACTITIONERS[co].name, "clinician", first.id, "clinician", co)
        )
    for other in second.other_practitioners:
        people.append(
            GroupVisitPerson(
                other, PRACTITIONERS[other].name, "interpreter", second.id, "clinician", other
            )
        )
    for appt in (first, second):
        people.append(
            GroupVisitPerson(
                appt.patient_id,
                PATIENTS[appt.patient_id].name,
                "patient",
                appt.id,
                "patient",
                None,
            )
        )
    return people


def _sensitive() -> list[str]:
    values: list[str] = []
    for p in PRACTITIONERS.values():
        values += [p.id, p.given, p.family, p.name, p.npi]
    for pt in PATIENTS.values():
        values += [pt.id, pt.given, pt.family, pt.name, pt.mrn]
    for a in APPOINTMENTS.values():
        values.append(a.id)
        if a.encounter_id:
            values.append(a.encounter_id)
    values.append(CONFERENCE_ID)
    return list(dict.fromkeys(values))


SENSITIVE_VALUES: list[str] = _sensitive()
"""Every name (full, given, family), MRN, NPI and resource/conference id in the seed."""


# --- FHIR R4 JSON --------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def practitioner_resource(p: SeedPractitioner) -> dict[str, Any]:
    name: dict[str, Any] = {
        "use": "official",
        "text": p.name,
        "family": p.family,
        "given": [p.given],
    }
    if p.prefix:
        name["prefix"] = [p.prefix]
    return {
        "resourceType": "Practitioner",
        "id": p.id,
        "meta": {"versionId": "1"},
        "identifier": [{"system": NPI_SYSTEM, "value": p.npi}],
        "active": True,
        "name": [name],
    }


def patient_resource(p: SeedPatient) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": p.id,
        "meta": {"versionId": "1"},
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                        }
                    ],
                    "text": "MRN",
                },
                "system": MRN_SYSTEM,
                "value": p.mrn,
            }
        ],
        "active": True,
        "name": [{"use": "official", "text": p.name, "family": p.family, "given": [p.given]}],
        "gender": p.gender,
        "birthDate": p.birth_date,
    }


def appointment_resource(a: SeedAppointment, day: date | None = None) -> dict[str, Any]:
    clinician = PRACTITIONERS[a.practitioner_id]
    patient = PATIENTS[a.patient_id]
    participants: list[dict[str, Any]] = [
        {
            "actor": {"reference": f"Patient/{patient.id}", "display": patient.name},
            "required": "required",
            "status": "accepted",
        },
        {
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "PPRF",
                            "display": "primary performer",
                        }
                    ]
                }
            ],
            "actor": {"reference": f"Practitioner/{clinician.id}", "display": clinician.name},
            "required": "required",
            "status": "accepted",
        },
    ]
    for co_id in a.co_clinicians:
        co = PRACTITIONERS[co_id]
        participants.append(
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "SPRF",
                                "display": "secondary performer",
                            }
                        ]
                    }
                ],
                "actor": {"reference": f"Practitioner/{co.id}", "display": co.name},
                "required": "required",
                "status": "accepted",
            }
        )
    for other_id in a.other_practitioners:
        other = PRACTITIONERS[other_id]
        participants.append(
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "TRANS",
                                "display": "Translator",
                            }
                        ]
                    }
                ],
                "actor": {"reference": f"Practitioner/{other.id}", "display": other.name},
                "required": "required",
                "status": "accepted",
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": a.id,
        "meta": {"versionId": "1"},
        "status": "booked",
        "serviceType": [{"text": a.visit_type}],
        "appointmentType": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0276",
                    "code": "ROUTINE",
                }
            ],
            "text": a.visit_type,
        },
        "start": _iso(a.start(day)),
        "end": _iso(a.end(day)),
        "minutesDuration": a.minutes,
        "participant": participants,
    }
    if a.conference_id:
        resource["identifier"] = [{"system": CONFERENCE_ID_SYSTEM, "value": a.conference_id}]
    return resource


def encounter_resource(encounter_id: str, day: date | None = None) -> dict[str, Any]:
    a = APPOINTMENTS[ENCOUNTERS[encounter_id]]
    clinician = PRACTITIONERS[a.practitioner_id]
    patient = PATIENTS[a.patient_id]
    return {
        "resourceType": "Encounter",
        "id": encounter_id,
        "meta": {"versionId": "1"},
        "status": "planned",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "VR",
            "display": "virtual",
        },
        "subject": {"reference": f"Patient/{patient.id}", "display": patient.name},
        "participant": [
            {"individual": {"reference": f"Practitioner/{clinician.id}", "display": clinician.name}}
        ],
        "appointment": [{"reference": f"Appointment/{a.id}"}],
        "period": {"start": _iso(a.start(day)), "end": _iso(a.end(day))},
    }
