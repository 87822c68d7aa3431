"""GraphClient over httpx.MockTransport: createOrGet, retries, known failures, subscriptions."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509

from connector_core.adapters.graph import MAX_ATTEMPTS, GraphClient, notification_certificate
from connector_core.errors import GraphError
from tests.helpers import make_settings

GRAPH = "http://127.0.0.1:7480"
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[index].content)  # type: ignore[no-any-return]


def _meeting(status: int = 201) -> httpx.Response:
    return httpx.Response(
        status, json={"id": "m1", "joinWebUrl": f"{GRAPH}/l/meetup-join/x/0?context=%7b%7d"}
    )


def _error(status: int, message: str, code: str = "Err", **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": message}}, headers=headers
    )


def _client(recorder: Recorder, sleeps: list[float] | None = None) -> tuple[GraphClient, list[str]]:
    tokens: list[str] = []

    def token(tenant_id: str) -> str:
        tokens.append(tenant_id)
        return f"token-{len(tokens)}"

    client = GraphClient(
        http=httpx.Client(transport=httpx.MockTransport(recorder)),
        settings=make_settings(),
        token_provider=token,
        sleep=(sleeps.append if sleeps is not None else lambda _s: None),
    )
    return client, tokens


def _create(client: GraphClient) -> Any:
    now = datetime(2026, 1, 1, 9, tzinfo=UTC)
    return client.create_or_get_meeting(
        tenant_id="tid",
        organizer_oid="oid-1",
        external_id="vk",
        subject="Virtual visit",
        start=now,
        end=now + timedelta(hours=1),
    )


def test_create_or_get_body_and_result() -> None:
    recorder = Recorder(_meeting(201))
    client, _ = _client(recorder)
    meeting = _create(client)
    assert meeting.created and meeting.id == "m1"
    request = recorder.requests[0]
    assert request.url.path == "/v1.0/users/oid-1/onlineMeetings/createOrGet"
    assert request.headers["authorization"] == "Bearer token-1"
    body = recorder.body()
    assert body["externalId"] == "vk"
    assert body["subject"] == "Virtual visit"
    assert body["lobbyBypassSettings"] == {"scope": "organizer", "isDialInBypassEnabled": False}
    assert body["allowMeetingChat"] == "limited"
    assert body["startDateTime"] == "2026-01-01T09:00:00.000Z"


def test_create_or_get_200_means_the_meeting_existed() -> None:
    client, _ = _client(Recorder(_meeting(200)))
    assert not _create(client).created


def test_429_is_retried_honouring_retry_after() -> None:
    recorder = Recorder(_error(429, "Too many", **{"Retry-After": "2"}), _meeting(201))
    sleeps: list[float] = []
    client, _ = _client(recorder, sleeps)
    assert _create(client).created
    assert sleeps == [2.0]
    assert len(recorder.requests) == 2


def test_persistent_503_gives_up_after_bounded_attempts() -> None:
    recorder = Recorder(_error(503, "busy", **{"Retry-After": "120"}))
    sleeps: list[float] = []
    client, _ = _client(recorder, sleeps)
    with pytest.raises(GraphError) as caught:
        _create(client)
    assert caught.value.extra["reason"] == "throttled"
    assert len(recorder.requests) == MAX_ATTEMPTS
    assert all(s <= 10 for s in sleeps)  # a long Retry-After is capped


def test_403_application_access_policy_is_recognised() -> None:
    recorder = Recorder(
        _error(403, "No application access policy found for this app.", "Forbidden")
    )
    client, _ = _client(recorder)
    with pytest.raises(GraphError) as caught:
        _create(client)
    assert caught.value.extra["reason"] == "application_access_policy"
    assert "administrator" in caught.value.extra["action"]


def test_404_for_the_organizer_is_user_not_found() -> None:
    client, _ = _client(Recorder(_error(404, "User 'x' was not found", "NotFound")))
    with pytest.raises(GraphError) as caught:
        _create(client)
    assert caught.value.extra["reason"] == "user_not_found"


def test_401_refetches_the_token_once() -> None:
    recorder = Recorder(_error(401, "expired", "InvalidAuthenticationToken"), _meeting(201))
    client, tokens = _client(recorder)
    _create(client)
    assert len(tokens) == 2
    assert recorder.requests[1].headers["authorization"] == "Bearer token-2"


def test_create_subscription_request() -> None:
    expires = datetime(2026, 1, 3, tzinfo=UTC)
    recorder = Recorder(
        httpx.Response(
            201, json={"id": "sub-1", "expirationDateTime": "2026-01-02T10:00:00.1234567Z"}
        )
    )
    client, _ = _client(recorder)
    join = f"{GRAPH}/l/meetup-join/x/0?context=%7b%7d"
    sub_id, when = client.create_subscription(
        tenant_id="tid", join_web_url=join, client_state="secret", expires_at=expires
    )
    assert sub_id == "sub-1"
    assert when == datetime(2026, 1, 2, 10, 0, 0, 123456, tzinfo=UTC)
    request = recorder.requests[0]
    assert request.url.path == "/beta/subscriptions"
    body = recorder.body()
    assert body["resource"] == f"communications/onlineMeetings/?$filter=JoinWebUrl eq '{join}'"
    assert body["changeType"] == "updated"
    assert body["notificationUrl"] == "http://127.0.0.1:7071/api/presence"
    assert body["lifecycleNotificationUrl"] == "http://127.0.0.1:7071/api/presence/lifecycle"
    assert body["includeResourceData"] is True
    assert body["clientState"] == "secret"
    der = base64.b64decode(body["encryptionCertificate"])
    x509.load_der_x509_certificate(der)
    assert body["encryptionCertificateId"] == hashlib.sha256(der).hexdigest()


def test_subscription_failure_is_a_graph_error() -> None:
    client, _ = _client(
        Recorder(_error(400, "Subscription validation request failed", "InvalidRequest"))
    )
    with pytest.raises(GraphError) as caught:
        client.create_subscription(
            tenant_id="t", join_web_url="u", client_state="s", expires_at=datetime.now(UTC)
        )
    assert "400 InvalidRequest" in caught.value.detail


def test_delete_subscription_is_idempotent() -> None:
    recorder = Recorder(_error(404, "gone"))
    client, _ = _client(recorder)
    client.delete_subscription(tenant_id="t", subscription_id="s1")
    assert recorder.requests[0].method == "DELETE"


def test_renew_and_reauthorize() -> None:
    recorder = Recorder(
        httpx.Response(200, json={"expirationDateTime": "2026-01-05T00:00:00Z"}),
        httpx.Response(204),
    )
    client, _ = _client(recorder)
    when = client.renew_subscription(
        tenant_id="t", subscription_id="s1", expires_at=datetime(2026, 1, 5, tzinfo=UTC)
    )
    assert when == datetime(2026, 1, 5, tzinfo=UTC)
    assert recorder.requests[0].method == "PATCH"
    client.reauthorize_subscription(tenant_id="t", subscription_id="s1")
    assert recorder.requests[1].url.path == "/beta/subscriptions/s1/reauthorize"


def test_notification_certificate_from_settings() -> None:
    pem = make_settings().graph_notification_cert.get_secret_value()
    cert, cert_id = notification_certificate(pem)
    assert len(cert_id) == 64
    assert base64.b64decode(cert)
