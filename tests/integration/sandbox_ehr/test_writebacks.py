"""A sandbox you can look into: AuditEvent search (FHIR R4 parameters), the write-backs each
appointment received on the EHR page, the group visit's people, bounded storage."""

from __future__ import annotations

import copy
import html
import re
from typing import Any

import httpx
import pytest

from devtools.sandbox import ehr as ehr_module
from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr
from tests.integration.sandbox_ehr.conftest import ClientKeys, Ehr, backend_token

SOLO = "appt-6b1e0d34"  # prac-7f3a91c2, pat-3c9e1f40, encounter enc-4f2c8a19
OTHER = "appt-93af2c6b"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _event(
    appointment: str, who: str, recorded: str, *, connect: bool = True, key: str = ""
) -> dict[str, Any]:
    entities: list[dict[str, Any]] = [{"what": {"reference": f"Appointment/{appointment}"}}]
    if key:
        entities.append({"what": {"identifier": {"system": "urn:test:writeback", "value": key}}})
    return {
        "resourceType": "AuditEvent",
        "type": {"system": DCM, "code": "110114", "display": "User Authentication"},
        "subtype": [{"system": DCM, "code": "110122" if connect else "110123"}],
        "action": "E",
        "recorded": recorded,
        "outcome": "0",
        "outcomeDesc": f"clinician {'connected' if connect else 'disconnected'}",
        "agent": [{"who": {"reference": who}, "requestor": True}],
        "source": {"observer": {"display": "EHR virtual-visit connector"}},
        "entity": entities,
    }


def _headers(http: httpx.Client, ehr: Ehr, keys: ClientKeys, scope: str) -> dict[str, str]:
    token = backend_token(http, ehr, keys, scope=scope).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def stored(http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys) -> dict[str, str]:
    """Three write-backs of SOLO and one of OTHER; the reader's headers."""
    ehr.clear_writebacks()
    writer = _headers(http, ehr, client_keys, "system/AuditEvent.c")
    clinician = f"Practitioner/{seed.APPOINTMENTS[SOLO].practitioner_id}"
    patient = f"Patient/{seed.APPOINTMENTS[SOLO].patient_id}"
    for body in (
        _event(SOLO, clinician, "2031-05-04T10:00:00Z", key="k1"),
        _event(SOLO, patient, "2031-05-04T10:02:00Z"),
        _event(SOLO, clinician, "2031-05-04T10:30:00Z", connect=False),
        _event(OTHER, "Practitioner/prac-c41d6a05", "2031-05-05T09:00:00Z"),
    ):
        response = http.post(f"{ehr.fhir_base}/AuditEvent", json=body, headers=writer)
        assert response.status_code == 201, response.text
    return _headers(http, ehr, client_keys, "system/AuditEvent.rs")


def _search(http: httpx.Client, ehr: SandboxEhr, headers: dict[str, str], **params: str) -> Any:
    response = http.get(f"{ehr.fhir_base}/AuditEvent", params=params, headers=headers)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def _recorded(bundle: Any) -> list[str]:
    return [e["resource"]["recorded"] for e in bundle["entry"]]


def test_search_by_entity_agent_date_type_and_subtype(
    http: httpx.Client, ehr: SandboxEhr, stored: dict[str, str]
) -> None:
    base = ehr.fhir_base
    solo = _search(http, ehr, stored, entity=f"Appointment/{SOLO}")
    assert solo["total"] == 3
    # an absolute reference on this server is the same reference
    assert _search(http, ehr, stored, entity=f"{base}/Appointment/{SOLO}")["total"] == 3
    clinician = f"Practitioner/{seed.APPOINTMENTS[SOLO].practitioner_id}"
    assert _search(http, ehr, stored, agent=clinician)["total"] == 2
    assert _search(http, ehr, stored, subtype=f"{DCM}|110123")["total"] == 1
    assert _search(http, ehr, stored, subtype="110122", entity=f"Appointment/{SOLO}")["total"] == 2
    assert _search(http, ehr, stored, type=f"{DCM}|110114")["total"] == 4
    assert _search(http, ehr, stored, type="other-system|110114")["total"] == 0
    # date: a day is a range; prefixes compare with it
    assert _search(http, ehr, stored, date="2031-05-04")["total"] == 3
    assert _search(http, ehr, stored, date="gt2031-05-04")["total"] == 1
    assert _search(http, ehr, stored, date="ge2031-05-04T10:02:00Z")["total"] == 3
    assert _search(http, ehr, stored, date="lt2031-05-04T10:02:00Z")["total"] == 1
    # the connector's own search before a retry still works
    keyed = _search(http, ehr, stored, **{"entity:identifier": "urn:test:writeback|k1"})
    assert keyed["total"] == 1


def test_search_sorts_and_counts(
    http: httpx.Client, ehr: SandboxEhr, stored: dict[str, str]
) -> None:
    newest = _search(http, ehr, stored, entity=f"Appointment/{SOLO}", _sort="-date")
    assert _recorded(newest) == sorted(_recorded(newest), reverse=True)
    oldest = _search(http, ehr, stored, entity=f"Appointment/{SOLO}", _sort="date", _count="1")
    assert oldest["total"] == 3 and _recorded(oldest) == ["2031-05-04T10:00:00Z"]
    entry = oldest["entry"][0]
    assert entry["search"] == {"mode": "match"}
    assert entry["fullUrl"] == f"{ehr.fhir_base}/AuditEvent/{entry['resource']['id']}"
    assert entry["resource"]["meta"]["lastUpdated"].endswith("Z")


def test_search_pages_with_a_next_link(
    http: httpx.Client, ehr: SandboxEhr, stored: dict[str, str]
) -> None:
    first = _search(http, ehr, stored, entity=f"Appointment/{SOLO}", _sort="date", _count="2")
    assert first["total"] == 3 and len(first["entry"]) == 2
    following = [link["url"] for link in first["link"] if link["relation"] == "next"]
    assert len(following) == 1
    response = http.get(following[0], headers=stored)
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["total"] == 3 and _recorded(second) == ["2031-05-04T10:30:00Z"]
    assert not [link for link in second["link"] if link["relation"] == "next"]
    seen = {e["resource"]["id"] for e in first["entry"] + second["entry"]}
    assert len(seen) == 3


@pytest.mark.parametrize(
    "params",
    [
        {"patient": "Patient/x"},
        {"_sort": "recorded"},
        {"_count": "many"},
        {"date": "yesterday"},
        {"entity": "not a reference"},
        {"entity:identifier": "no-bar"},
    ],
)
def test_unsupported_search_is_a_clear_400(
    http: httpx.Client, ehr: SandboxEhr, stored: dict[str, str], params: dict[str, str]
) -> None:
    response = http.get(f"{ehr.fhir_base}/AuditEvent", params=params, headers=stored)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_search_needs_a_system_read_token(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys
) -> None:
    url = f"{ehr.fhir_base}/AuditEvent"
    assert http.get(url, params={"entity": f"Appointment/{SOLO}"}).status_code == 401
    writer = _headers(http, ehr, client_keys, "system/AuditEvent.c")
    assert http.get(url, params={"entity": f"Appointment/{SOLO}"}, headers=writer).status_code == (
        403
    )


def test_the_page_shows_each_appointments_writebacks_and_epic_calls(
    http: httpx.Client, ehr: SandboxEhr, client_keys: ClientKeys, stored: dict[str, str]
) -> None:
    epic = ehr.profile("epic")
    writer = _headers(http, epic, client_keys, "system/AuditEvent.c")
    first, second = seed.GROUP_APPOINTMENT_IDS
    call = {
        "ConferenceID": seed.CONFERENCE_ID,
        "ExternalID": seed.APPOINTMENTS[second].patient_id,
        "ExternalIDType": "FHIR",
        "ConnectionStatus": "Connected",
    }
    assert epic.epic_status_url
    assert http.post(epic.epic_status_url, json=call, headers=writer).status_code == 200

    page = http.get(f"{ehr.base_url}/").text
    lists = dict(
        re.findall(
            r'<ul class="writebacks" data-profile="default" data-appointment="([^"]+)"[^>]*>'
            r"(.*?)</ul>",
            page,
        )
    )
    solo = html.unescape(lists[SOLO])
    assert solo.count("<li") == 3
    clinician = seed.PRACTITIONERS[seed.APPOINTMENTS[SOLO].practitioner_id].name
    assert f"AuditEvent: {clinician} connected" in solo
    assert f"AuditEvent: {clinician} disconnected" in solo
    assert "<time>10:00:00</time>" in solo
    assert lists[OTHER].count("<li") == 1
    assert lists[first] == ""  # nothing for the group visit at the default profile

    # the Epic call lands on the appointment of the patient it names, in the epic table only
    by_profile = http.get(f"{ehr.base_url}/writebacks").json()
    assert by_profile["epic"][second][0]["kind"] == "epic"
    assert "Connected" in by_profile["epic"][second][0]["text"]
    assert first not in by_profile["epic"]
    assert second not in by_profile["default"]
    assert len(by_profile["default"][SOLO]) == 3


def test_the_page_offers_the_group_visits_people(http: httpx.Client, ehr: SandboxEhr) -> None:
    epic = ehr.profile("epic")
    page = http.get(f"{ehr.base_url}/", params={"config_epic": "cfg-epic"}).text
    buttons = re.findall(
        r'<a class="group-launch" data-role="(\w+)" data-person="([^"]+)" '
        r'data-appointment="([^"]+)" data-profile="epic" href="([^"]+)"',
        page,
    )
    people = {person for _, person, _, _ in buttons}
    first, second = (seed.APPOINTMENTS[a] for a in seed.GROUP_APPOINTMENT_IDS)
    assert people == {
        first.practitioner_id,
        seed.GROUP_CO_CLINICIAN_ID,
        seed.INTERPRETER_ID,
        first.patient_id,
        second.patient_id,
    }
    assert [role for role, *_ in buttons].count("clinician") == 3
    for _, _, _, href in buttons:
        assert f"sessionId={seed.CONFERENCE_ID}" in html.unescape(href)  # as Epic sends it
        assert html.unescape(href).startswith(f"{ehr.connector_url}/api/launch/")
    assert epic.fhir_base in page
    # Oracle Health's encounter-only context has no group visit table
    assert 'class="group-visit" data-profile="oracle"' not in page


def test_stored_writebacks_and_launches_stay_bounded(
    http: httpx.Client,
    ehr: SandboxEhr,
    client_keys: ClientKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ehr_module, "MAX_AUDIT_EVENTS", 3)
    monkeypatch.setattr(ehr_module, "MAX_LAUNCHES", 4)
    ehr.clear_writebacks()
    writer = _headers(http, ehr, client_keys, "system/AuditEvent.c")
    reader = _headers(http, ehr, client_keys, "system/AuditEvent.rs")
    for n in range(6):
        body = copy.deepcopy(_event(SOLO, "Practitioner/prac-7f3a91c2", f"2032-01-01T00:0{n}:00Z"))
        body["entity"].append(
            {"what": {"identifier": {"system": "urn:test:bound", "value": str(n)}}}
        )
        assert http.post(f"{ehr.fhir_base}/AuditEvent", json=body, headers=writer).is_success
    assert len(ehr.audit_events) <= 3
    assert _search(http, ehr, reader, date="ge2032-01-01")["total"] == 3
    # the oldest went, with its identifier index entry
    gone = {"entity:identifier": "urn:test:bound|0"}
    assert _search(http, ehr, reader, **gone)["total"] == 0
    for _ in range(10):
        ehr.make_launch(appointment_id=SOLO, user="clinician")
    assert len(ehr._launches) <= 4
