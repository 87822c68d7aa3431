"""EhrWriter over httpx.MockTransport: which EHR answers mean "the token was rejected" (the
caller then fetches a fresh token once), and ``fresh`` dropping the cached token."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from connector_core.adapters.ehr_writeback import (
    EhrWriter,
    WritebackContext,
    _resource,
    build_audit_event,
    validate_audit_event,
)
from connector_core.domain.models import ParticipantRole
from connector_core.domain.presence import TransitionKind, WritebackOutcome
from connector_core.errors import EhrError

BASE = "https://ehr.example/api/FHIR/R4"


class Tokens:
    """The SmartClient side of EhrWriter: records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.issued = 0

    def get_configuration(self, fhir_base_url: str, *, allowed_hosts: Any = ()) -> str:
        self.calls.append(("discovery", tuple(allowed_hosts)))
        return "smart"

    def backend_token(self, smart: Any, *, client_id: str, scope: str) -> str:
        self.issued += 1
        self.calls.append(("token", scope))
        return f"t{self.issued}"

    def forget_backend_token(self, smart: Any, *, client_id: str, scope: str) -> None:
        self.calls.append(("forget", scope))


def _writer(status: int, headers: dict[str, str] | None = None) -> tuple[EhrWriter, Tokens]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers or {}, json={"resourceType": "x"})

    tokens = Tokens()
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return EhrWriter(http=http, tokens=tokens), tokens


@pytest.mark.parametrize(
    ("status", "headers", "rejected"),
    [
        (401, {}, True),
        (401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, True),
        (403, {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="x"'}, True),
        (403, {"WWW-Authenticate": 'Bearer error="insufficient_scope"'}, False),
        (403, {}, False),
        (500, {}, False),
        (503, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, False),
    ],
)
def test_token_rejection_is_marked(status: int, headers: dict[str, str], rejected: bool) -> None:
    writer, _ = _writer(status, headers)
    with pytest.raises(EhrError) as caught:
        writer.post_audit_event(BASE, {"resourceType": "AuditEvent"}, token="t")
    assert caught.value.extra["ehrStatus"] == status
    assert (caught.value.extra.get("reason") == "token_rejected") is rejected


def test_accepted_write_raises_nothing() -> None:
    writer, _ = _writer(201)
    writer.post_audit_event(BASE, {"resourceType": "AuditEvent"}, token="t")


def test_fresh_token_drops_the_cached_one_first() -> None:
    writer, tokens = _writer(201)
    scope = "system/AuditEvent.write"
    allowance = ("auth.vendor-cloud.example.net",)
    assert writer.backend_token(BASE, client_id="c", scope=scope, allowed_hosts=allowance) == "t1"
    assert tokens.calls == [("discovery", allowance), ("token", scope)]
    tokens.calls.clear()
    assert writer.backend_token(BASE, client_id="c", scope=scope, fresh=True) == "t2"
    assert tokens.calls == [("discovery", ()), ("forget", scope), ("token", scope)]


# --- conditional create, reconcile, what a failure tells the retry --------------------------------


def _recording(*responses: httpx.Response | Exception) -> tuple[EhrWriter, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    answers = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = httpx.Client(transport=httpx.MockTransport(handler))
    return EhrWriter(http=http, tokens=Tokens()), seen


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (201, WritebackOutcome.CREATED),
        (200, WritebackOutcome.EXISTED),  # an earlier attempt stored it
        (412, WritebackOutcome.EXISTED),  # several match: it is there (more than once)
    ],
)
def test_the_audit_event_is_created_conditionally(status: int, outcome: WritebackOutcome) -> None:
    writer, seen = _recording(httpx.Response(status, json={"resourceType": "AuditEvent"}))
    got = writer.post_audit_event(
        BASE, {"resourceType": "AuditEvent"}, token="t", writeback_key="k1"
    )
    assert got is outcome
    assert seen[0].headers["If-None-Exist"] == (
        "entity:identifier=urn:ehr-virtual-visit:writeback|k1"
    )


def test_a_412_without_a_condition_is_an_error() -> None:
    writer, _ = _recording(httpx.Response(412))
    with pytest.raises(EhrError):
        writer.post_audit_event(BASE, {"resourceType": "AuditEvent"}, token="t")


@pytest.mark.parametrize(
    ("answer", "sent", "permanent"),
    [
        (httpx.ConnectError("refused"), False, False),
        (httpx.ConnectTimeout("connect"), False, False),
        (httpx.ReadTimeout("read"), True, False),  # the EHR may have stored it
        (httpx.RemoteProtocolError("cut"), True, False),
        (httpx.Response(503), True, False),
        (httpx.Response(500), True, False),
        (httpx.Response(429), False, False),
        (httpx.Response(403), False, False),
        (httpx.Response(400), False, True),  # the same request never passes
        (httpx.Response(422), False, True),
    ],
)
def test_a_failure_says_whether_it_may_have_reached_the_ehr(
    answer: httpx.Response | Exception, sent: bool, permanent: bool
) -> None:
    writer, _ = _recording(answer)
    with pytest.raises(EhrError) as caught:
        writer.post_audit_event(BASE, {"resourceType": "AuditEvent"}, token="t", writeback_key="k")
    assert caught.value.extra["sent"] is sent
    assert caught.value.extra["permanent"] is permanent


@pytest.mark.parametrize(
    ("total", "entries", "found"), [(1, 1, True), (0, 0, False), (None, 2, True)]
)
def test_reconcile_searches_by_the_write_back_identifier(
    total: int | None, entries: int, found: bool
) -> None:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "AuditEvent"}}] * entries,
    }
    if total is not None:
        bundle["total"] = total
    writer, seen = _recording(httpx.Response(200, json=bundle))
    assert writer.find_audit_event(BASE, token="t", writeback_key="k9") is found
    request = seen[0]
    assert request.method == "GET" and request.url.path.endswith("/AuditEvent")
    assert request.url.params["entity:identifier"] == "urn:ehr-virtual-visit:writeback|k9"


def test_a_search_answered_without_a_bundle_is_an_error() -> None:
    writer, _ = _recording(httpx.Response(200, json={"resourceType": "OperationOutcome"}))
    with pytest.raises(EhrError):
        writer.find_audit_event(BASE, token="t", writeback_key="k")


@pytest.mark.parametrize("role", list(ParticipantRole))
@pytest.mark.parametrize("transition", list(TransitionKind))
@pytest.mark.parametrize(
    "context",
    [
        WritebackContext(patient_id="p1", practitioner_id="d1", appointment_id="a1"),
        WritebackContext(encounter_id="e1"),
        WritebackContext(),
    ],
)
def test_the_kept_template_gives_the_resource_a_whole_validation_gives(
    role: ParticipantRole, transition: TransitionKind, context: WritebackContext
) -> None:
    at = datetime(2026, 3, 1, 10, 0, 1, 123456, tzinfo=UTC)
    kwargs: dict[str, Any] = {
        "transition": transition,
        "role": role,
        "participant_key": "f" * 64,
        "at": at,
        "context": context,
        "writeback_key": "0123456789abcdef" * 2,
        "site": "americas",
    }
    for _ in range(2):  # the second build comes from the template
        assert build_audit_event(**kwargs) == validate_audit_event(_resource(**kwargs))
    other = build_audit_event(**{**kwargs, "participant_key": "e" * 64, "at": at.replace(second=9)})
    assert other["agent"][0]["altId"] == "e" * 64 and other["recorded"].startswith(
        "2026-03-01T10:00:09"
    )


def _capability(conditional: object) -> dict[str, Any]:
    resource: dict[str, Any] = {"type": "AuditEvent", "interaction": [{"code": "create"}]}
    if conditional is not None:
        resource["conditionalCreate"] = conditional
    return {
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "resource": [{"type": "Patient"}, resource]}],
    }


@pytest.mark.parametrize(
    ("answer", "supported"),
    [
        (httpx.Response(200, json=_capability(True)), True),
        (httpx.Response(200, json=_capability(False)), False),
        (httpx.Response(200, json=_capability(None)), False),  # not said: not relied on
        (httpx.Response(200, json=_capability("true")), False),
        (httpx.Response(200, json={"resourceType": "OperationOutcome"}), False),
        (httpx.Response(503), False),
        (httpx.ConnectError("down"), False),
    ],
)
def test_conditional_create_is_relied_on_only_when_the_ehr_says_so(
    answer: httpx.Response | Exception, supported: bool
) -> None:
    writer, seen = _recording(answer)
    assert writer.conditional_create_supported(BASE) is supported
    assert seen[0].url.path.endswith("/metadata")


def test_what_the_capability_statement_says_is_kept_for_a_while() -> None:
    clock = [0.0]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_capability(True))

    http = httpx.Client(transport=httpx.MockTransport(handler))
    writer = EhrWriter(http=http, tokens=Tokens(), clock=lambda: clock[0])
    for _ in range(5):
        assert writer.conditional_create_supported(BASE)
    assert len(seen) == 1
    clock[0] += EhrWriter.CAPABILITY_TTL + 1
    writer.conditional_create_supported(BASE)
    assert len(seen) == 2
