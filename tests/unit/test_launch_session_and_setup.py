"""The launch URL's session id (Epic's ``sessionId=%CONFERENCEID%`` / ``%CSN%``) and the setup
mistakes EHR analysts make most, each with its own message."""

from __future__ import annotations

import uuid

import pytest

from connector_core.domain.models import Environment, TenantConfig, utcnow
from connector_core.domain.visit_keys import CONFERENCE_ID_SYSTEM, VisitIdentifier, visit_key
from connector_core.errors import InvalidInputError, PermissionDeniedError
from connector_core.service.launch import LaunchRole
from tests.unit.launch_fakes import (
    APPOINTMENT_ID,
    FHIR,
    TENANT,
    World,
    make_world,
    state_of,
)

OTHER_FHIR = "https://ehr-prod.example/fhir/r4"


@pytest.fixture
def world() -> World:
    w = make_world()
    w.map_clinician()
    return w


def _visit_of(world: World, role: LaunchRole = LaunchRole.PROVIDER, **start: str) -> str | None:
    result = world.callback(state_of(world.start(role, **start)))
    assert result.redirect or result.waiting
    keys = [
        row["PartitionKey"]
        for row in world.container.store.dump().get("vvamericasvisits", [])  # type: ignore[attr-defined]
    ]
    return keys[-1] if keys else None


def test_the_session_id_names_the_visit_ahead_of_the_appointment(world: World) -> None:
    _visit_of(world, session_id="conf-7781")
    key = visit_key(
        world.container.keyring, world.config.id, VisitIdentifier("conference", "conf-7781")
    )
    assert world.container.visits.get(key).record.join_web_url
    by_appointment = visit_key(
        world.container.keyring, world.config.id, VisitIdentifier("appointment", APPOINTMENT_ID)
    )
    with pytest.raises(Exception, match="No visit"):
        world.container.visits.get(by_appointment)


def test_two_appointments_of_one_group_visit_reach_one_meeting(world: World) -> None:
    first = world.callback(state_of(world.start(session_id="conf-9"))).redirect
    world.smart.context["fhirContext"] = [{"reference": "Appointment/the-other-patients"}]
    second = world.callback(state_of(world.start(session_id="conf-9"))).redirect
    assert first and first == second
    world.smart.fhir_user = f"{FHIR}/Patient/pat-secret-2"
    patient = world.callback(state_of(world.start(LaunchRole.PATIENT, session_id="conf-9")))
    assert patient.redirect == first + "&anon=true"  # the same meeting, as a browser guest


def test_the_ehrs_own_conference_identifier_wins_over_the_url(world: World) -> None:
    world.smart.context["fhirContext"] = [
        {"reference": f"Appointment/{APPOINTMENT_ID}"},
        {"identifier": {"system": CONFERENCE_ID_SYSTEM, "value": "from-the-token"}},
    ]
    world.callback(state_of(world.start(session_id="edited-in-the-url")))
    key = visit_key(
        world.container.keyring, world.config.id, VisitIdentifier("conference", "from-the-token")
    )
    assert world.container.visits.get(key).record.join_web_url


@pytest.mark.parametrize("value", ["%CONFERENCEID%", "%CSN%", "abc%20"])
def test_an_unfilled_session_token_is_a_setup_mistake_with_its_own_message(
    world: World, value: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        world.start(session_id=value)
    assert caught.value.extra["reason"] == "session_id_unfilled"
    assert "%CONFERENCEID%" in str(caught.value.extra["action"])


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_session_id_says_the_group_visit_link_lacked_its_conference_id(
    world: World, value: str
) -> None:
    """Epic fills %CONFERENCEID% with nothing for a visit that is no group visit."""
    with pytest.raises(InvalidInputError) as caught:
        world.start(session_id=value)
    assert caught.value.extra["reason"] == "session_id_missing"
    assert "conference id" in caught.value.detail
    assert "sessionId=%CONFERENCEID%" in str(caught.value.extra["action"])


def test_an_unusable_session_id_is_refused(world: World) -> None:
    with pytest.raises(InvalidInputError):
        world.start(session_id="x" * 129)
    with pytest.raises(InvalidInputError):
        world.start(session_id="line\nbreak")


def test_a_launch_from_the_tenants_other_environment_says_so(world: World) -> None:
    now = utcnow()
    world.container.configs.add(
        TenantConfig(
            id=uuid.uuid4().hex,
            tenant_id=TENANT,
            region=world.container.settings.region,
            fhir_base_url=OTHER_FHIR,
            approver_upn="approver@example.org",
            environment=Environment.PRODUCTION,
            created_at=now,
            created_by="test",
            updated_at=now,
        )
    )
    # the test configuration's launch URL, opened from the production EHR
    with pytest.raises(PermissionDeniedError) as caught:
        world.start(iss=OTHER_FHIR)
    assert caught.value.extra["reason"] == "other_environment"
    assert "test configuration" in caught.value.detail and "production" in caught.value.detail


def test_a_launch_from_an_unknown_ehr_keeps_the_plain_message(world: World) -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        world.start(iss="https://elsewhere.example/fhir/r4")
    assert caught.value.extra["reason"] == "untrusted_iss"
    assert "does not trust" in caught.value.detail
