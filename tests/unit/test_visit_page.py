"""The clinician's visit page, its event stream and the patient's device check, called as the
worker calls them (real func objects, in-memory storage); and the rules behind them."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import azure.functions as func
import pytest

from connector_core.bootstrap import Container
from connector_core.domain.models import ParticipantRole, ParticipantStatus, ProviderLanding
from connector_core.domain.presence import ParticipantRecord
from connector_core.domain.waiting import PATIENT_ARRIVAL_KEY, patient_arrival, settle_arrival
from connector_core.service import visit_page as service
from connector_core.service.visit_cookie import cookie_visits
from functions.device_test import device_test
from functions.visits import visit_events, visit_page
from tests.unit.presence_fakes import (
    ORGANIZER,
    STAFF_OID,
    TENANT,
    VISIT_KEY,
    container_fixture,  # noqa: F401 (the "container" fixture)
    deliver,
    guest,
    roster_event,
    user,
)

T0 = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)


def _get(route: str, headers: dict[str, str], key: str = VISIT_KEY) -> func.HttpRequest:
    return func.HttpRequest(
        method="GET",
        url=f"http://127.0.0.1/api/{route}",
        headers=headers,
        params={},
        route_params={"visitKey": key, "configId": key},
        body=b"",
    )


def page(headers: dict[str, str], key: str = VISIT_KEY) -> func.HttpResponse:
    return visit_page(_get(f"visits/{key}", headers, key))


def events(headers: dict[str, str], key: str = VISIT_KEY) -> func.HttpResponse:
    request = _get(f"visits/{key}/events", headers, key)
    return asyncio.run(visit_events(request))


def cookie_for(container: Container, key: str = VISIT_KEY) -> dict[str, str]:
    sealed = container.keyring.seal(
        "visit-cookie", {"visit_key": key, "role": "provider"}, ttl_seconds=60
    )
    return {"cookie": f"__Host-vv-visit={sealed}"}


# --- authorization ---------------------------------------------------------------------------


def test_page_without_cookie_is_a_friendly_401_page(container: Container) -> None:
    for key in (VISIT_KEY, "f" * 32):  # the same answer whether the visit exists or not
        response = page({}, key)
        assert response.status_code == 401
        assert response.mimetype == "text/html"
        text = response.get_body().decode()
        assert "correlation id" in text and "Traceback" not in text


def test_page_of_another_visit_is_a_friendly_403_page(container: Container) -> None:
    response = page(cookie_for(container, "b" * 32))
    assert response.status_code == 403 and response.mimetype == "text/html"
    forged = page({"cookie": "__Host-vv-visit=not-sealed"})
    assert forged.status_code == 401 and forged.mimetype == "text/html"
    # The credential is checked before the visit is read: an unknown visit answers the same.
    assert page({"cookie": "__Host-vv-visit=not-sealed"}, "f" * 32).status_code == 401
    assert page(cookie_for(container, "b" * 32), "f" * 32).status_code == 403


class _Tokens:
    """Entra token validation: every token genuine, for one user; counts the checks."""

    def __init__(self, oid: str, tid: str = TENANT) -> None:
        self.claims = {"oid": oid, "tid": tid}
        self.checks = 0

    def validate(self, token: str) -> dict[str, str]:
        self.checks += 1
        return self.claims


def test_a_bearer_token_opens_the_page_for_the_organizer_only(container: Container) -> None:
    bearer = {"authorization": "Bearer t"}
    for tokens, status in (
        (_Tokens(ORGANIZER.upper()), 200),
        (_Tokens(STAFF_OID), 403),  # same tenant, not the organizer
        (_Tokens(ORGANIZER, tid="11111111-1111-4111-8111-111111111111"), 403),  # another tenant
    ):
        container.portal_tokens = tokens  # type: ignore[assignment]
        assert page(bearer).status_code == status
        assert tokens.checks == 1  # validated once, before the visit is read


def test_stream_refusals_are_problem_json(container: Container) -> None:
    assert events({}).status_code == 401
    refused = events(cookie_for(container, "b" * 32))
    assert refused.status_code == 403
    assert refused.mimetype == "application/problem+json"
    assert json.loads(refused.get_body())["correlationId"]
    assert events(cookie_for(container), key="../x").status_code == 404


# --- the page and the stream -----------------------------------------------------------------


def test_page_opens_the_meeting_and_shows_who_is_here(container: Container) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER), guest("p-pat")]))
    response = page(cookie_for(container))
    assert response.status_code == 200 and response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'nonce-" in csp and "connect-src 'self'" in csp
    text = response.get_body().decode()
    join = container.visits.get(VISIT_KEY).record.join_web_url or ""
    assert 'data-open="app" href="msteams:' in text
    assert 'data-open="browser"' in text
    assert 'data-connected="2"' in text and 'data-status="connected"' in text
    assert "Clinician (you)" in text
    assert join.split("?")[0] in text


def test_teams_app_link_keeps_path_and_query() -> None:
    url = "https://teams.microsoft.com/l/meetup-join/19%3ameeting_x%40thread.v2/0?context=%7b%7d"
    assert service.teams_app_link(url) == (
        "msteams:/l/meetup-join/19%3ameeting_x%40thread.v2/0?context=%7b%7d"
    )


def test_stream_answers_at_once_when_the_view_changed_and_waits_otherwise(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER)]))
    first = events(cookie_for(container))
    assert first.status_code == 200 and first.mimetype == "text/event-stream"
    body = first.get_body().decode()
    assert body.startswith(f"retry: {service.STREAM_RETRY_MS}\n")
    event_id = body.split("id: ", 1)[1].split("\n", 1)[0]
    data = json.loads(body.split("data: ", 1)[1].split("\n", 1)[0])
    assert [p["status"] for p in data["connected"]] == ["connected"]

    monkeypatch.setattr(service, "STREAM_SECONDS", 0.3)
    monkeypatch.setattr(service, "STREAM_POLL_SECONDS", 0.1)
    same = events({**cookie_for(container), "last-event-id": event_id})
    assert same.get_body().decode().endswith(": no change\n\n")  # bounded: nothing held open

    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(datetime.now(UTC)))
    changed = events({**cookie_for(container), "last-event-id": event_id})
    view = json.loads(changed.get_body().decode().split("data: ", 1)[1].split("\n", 1)[0])
    assert view["patientWaitingInLobby"] is True


def test_each_check_of_the_stream_is_one_query_of_the_visit_and_its_participants(
    container: Container,
) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER), guest("g-1")]))
    deliver(container, roster_event(2, exited=[guest("g-1")]))
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(datetime.now(UTC)))
    rows = container.store.list_entities(  # type: ignore[attr-defined]
        container.visits._table,  # type: ignore[attr-defined]
        partition_key=VISIT_KEY,
    )
    assert any(str(row["RowKey"]).startswith("w-") for row, _ in rows)  # a ledger to skip
    visit = container.visits.get(VISIT_KEY).record
    expected = service.live_view(container, visit)
    store = container.store
    before = store.operations  # type: ignore[attr-defined]
    assert service.fresh_view(container, VISIT_KEY) == expected
    assert store.operations - before == 1  # type: ignore[attr-defined]
    fresh, participants = container.visits.with_participants(VISIT_KEY)
    assert fresh == visit and len(participants) == len(expected["participants"])


# --- the patient's arrival -------------------------------------------------------------------


def _patient(status: ParticipantStatus, at: datetime) -> ParticipantRecord:
    return ParticipantRecord(
        participant_key="ab" * 16, role=ParticipantRole.PATIENT, status=status, last_event_at=at
    )


def test_arrival_counts_as_waiting_until_a_later_patient_event() -> None:
    arrival = patient_arrival(T0)
    assert settle_arrival([arrival]) == [arrival]
    older = _patient(ParticipantStatus.LEFT, T0 - timedelta(minutes=5))
    assert settle_arrival([older, arrival]) == [older, arrival]  # came back after leaving
    admitted = _patient(ParticipantStatus.CONNECTED, T0 + timedelta(seconds=30))
    assert settle_arrival([arrival, admitted]) == [admitted]
    ended = arrival.model_copy(update={"status": ParticipantStatus.LEFT})
    assert settle_arrival([ended]) == []  # the call ended: not waiting any more


def test_arrival_shows_in_the_participants_view(container: Container) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER)]))
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(datetime.now(UTC)))
    visit = container.visits.get(VISIT_KEY).record
    view = service.live_view(container, visit)
    assert view["patientWaitingInLobby"] is True
    assert [p["status"] for p in view["participants"]] == ["connected", "lobby"]
    # one row, overwritten by the next arrival: nothing grows with repeated launches
    container.visits.record_patient_arrival(VISIT_KEY, patient_arrival(datetime.now(UTC)))
    keys = [p.participant_key for p in container.visits.participants(visit)]
    assert keys.count(PATIENT_ARRIVAL_KEY) == 1


# --- device check ----------------------------------------------------------------------------


def test_device_check_page_sends_nothing_anywhere(container: Container) -> None:
    config_id = _approved_config_id(container)
    request = func.HttpRequest(
        method="GET",
        url=f"http://127.0.0.1/api/device-test/{config_id}",
        headers={"accept-language": "es"},
        params={},
        route_params={"configId": config_id},
        body=b"",
    )
    response = device_test(request)
    assert response.status_code == 200
    assert "connect-src 'none'" in response.headers["Content-Security-Policy"]
    assert "camera=(self)" in response.headers["Permissions-Policy"]
    text = response.get_body().decode()
    assert 'lang="es"' in text and "getUserMedia" in text and "Nada sale" in text
    unknown = func.HttpRequest(
        method="GET",
        url="http://127.0.0.1/api/device-test/nope",
        headers={},
        params={},
        route_params={"configId": "nope"},
        body=b"",
    )
    missing = device_test(unknown)
    assert missing.status_code == 404 and missing.mimetype == "text/html"


def _approved_config_id(container: Container) -> str:
    from devtools.seed_config import add_approved_config

    return add_approved_config(
        container,
        tenant_id="11111111-1111-1111-1111-111111111111",
        fhir_base_url="https://ehr.example/fhir/r4",
        endpoint_hosts=(),
        provider_landing=ProviderLanding.VISIT_PAGE,
    ).id


# --- the provider launch lands on the visit page ----------------------------------------------


def test_provider_launch_lands_on_the_visit_page_and_the_patient_launch_is_recorded() -> None:
    from connector_core.service.launch import VISIT_COOKIE, LaunchRole
    from tests.unit.launch_fakes import FHIR, make_world

    world = make_world(landing=ProviderLanding.VISIT_PAGE)
    world.map_clinician()
    clinician = world.launch()
    key = clinician.redirect.rsplit("/", 1)[-1] if clinician.redirect else ""
    assert clinician.redirect == f"{world.container.settings.api_base_url}/visits/{key}"
    sealed = next(c.value for c in clinician.cookies if c.name == VISIT_COOKIE)
    assert [k for k, _ in cookie_visits(world.container.keyring, sealed)] == [key]
    visit = world.container.visits.get(key).record
    assert not service.live_view(world.container, visit)["patientWaitingInLobby"]

    world.smart.fhir_user = f"{FHIR}/Patient/pat-secret-1"
    patient = world.launch(LaunchRole.PATIENT)
    assert patient.redirect and patient.redirect.endswith("&anon=true")  # straight to the lobby
    assert service.live_view(world.container, visit)["patientWaitingInLobby"] is True
