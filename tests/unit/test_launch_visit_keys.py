"""Pure launch helpers: FHIR references, launch context, visit and EHR user keys."""

from __future__ import annotations

import pytest

from connector_core.crypto import Keyring
from connector_core.domain.visit_keys import (
    CONFERENCE_ID_SYSTEM,
    VisitIdentifier,
    ehr_user_key,
    parse_reference,
    read_launch_context,
    visit_key,
)

KEYRING = Keyring(b"k" * 32)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Practitioner/p1", "Practitioner/p1"),
        ("https://ehr.example/fhir/r4/Practitioner/p1", "Practitioner/p1"),
        ("https://ehr.example/fhir/r4/Practitioner/p1/_history/3", "Practitioner/p1"),
        ("/Patient/x%2Fy", "Patient/x/y"),
        ("p1", None),
        ("practitioner/p1", None),
        ("Practitioner/p1\r\nX: y", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_reference(value: object, expected: str | None) -> None:
    assert parse_reference(value) == expected


def test_parse_reference_expected_types() -> None:
    assert parse_reference("Patient/p", expected=("Practitioner",)) is None


def test_visit_identifier_prefers_conference_then_appointment_then_encounter() -> None:
    conference = {"identifier": {"system": CONFERENCE_ID_SYSTEM, "value": "c1"}}
    appointment = {"reference": "Appointment/a1"}
    ctx = read_launch_context(patient="p", encounter="e1", fhir_context=[appointment, conference])
    assert ctx.visit_identifier() == VisitIdentifier("conference", "c1")
    assert ctx.patient == "Patient/p" and ctx.encounter == "Encounter/e1"
    ctx = read_launch_context(patient="p", encounter="e1", fhir_context=[appointment])
    assert ctx.visit_identifier() == VisitIdentifier("appointment", "a1")
    ctx = read_launch_context(patient=None, encounter="e1", fhir_context=[])
    assert ctx.visit_identifier() == VisitIdentifier("encounter", "e1")
    ctx = read_launch_context(
        patient=None, encounter=None, fhir_context=[{"reference": "Encounter/e2"}]
    )
    assert ctx.visit_identifier() == VisitIdentifier("encounter", "e2")
    assert (
        read_launch_context(patient="p", encounter=None, fhir_context=[]).visit_identifier() is None
    )


def test_other_identifier_systems_are_not_conferences() -> None:
    ctx = read_launch_context(
        patient=None,
        encounter=None,
        fhir_context=[{"identifier": {"system": "urn:x", "value": "v"}}],
    )
    assert ctx.conference_id is None


def test_keys_are_keyed_hashes_scoped_per_config_and_kind() -> None:
    a = visit_key(KEYRING, "cfg1", VisitIdentifier("appointment", "a1"))
    assert a == visit_key(KEYRING, "cfg1", VisitIdentifier("appointment", "a1"))
    assert a != visit_key(KEYRING, "cfg2", VisitIdentifier("appointment", "a1"))
    assert a != visit_key(KEYRING, "cfg1", VisitIdentifier("encounter", "a1"))
    assert a != visit_key(Keyring(b"z" * 32), "cfg1", VisitIdentifier("appointment", "a1"))
    assert "a1" not in a and len(a) == 32
    user = ehr_user_key(KEYRING, "https://ehr/fhir", "Practitioner/p1")
    assert user != ehr_user_key(KEYRING, "https://other/fhir", "Practitioner/p1")
