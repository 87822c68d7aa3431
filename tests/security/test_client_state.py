"""The webhook compares ``clientState`` in constant time (``hmac.compare_digest``), and refuses
every wrong value: same length, other length, missing, not a string, the secret's prefix.

Behaviour through the real webhook function (``functions.presence.presence_webhook`` with a
``func.HttpRequest``) over an in-memory container; the constant-time comparison by recording
the calls ``hmac.compare_digest`` receives while the webhook runs."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import azure.functions as func
import pytest

from connector_core.bootstrap import Container, reset_container, set_container
from connector_core.domain.models import GraphSubscription, Region, utcnow
from functions.presence import presence_webhook
from tests.helpers import in_memory_container

SECRET = "s3cr3t-client-state-0123456789abcdef"
SUB_ID = "sub-constant-time"
TENANT = "3f8d2a6b-5c1e-4b7a-9e2d-7a41c0b8e915"


@pytest.fixture
def container() -> Iterator[Container]:
    c = in_memory_container()
    now = utcnow()
    c.subscriptions.upsert(
        GraphSubscription(
            subscription_id=SUB_ID,
            region=Region.AMERICAS,
            visit_key="ab" * 32,
            tenant_id=TENANT,
            client_state_sealed=c.keyring.seal("client-state", {"clientState": SECRET}),
            expires_at=now + timedelta(days=1),
            created_at=now,
        )
    )
    set_container(c)
    yield c
    reset_container()


def _item(client_state: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "subscriptionId": SUB_ID,
        "changeType": "updated",
        "tenantId": TENANT,
        "resource": "communications/onlineMeetings/x",
        "resourceData": {
            "eventType": "Microsoft.Communication.CallStarted",
            "eventDateTime": "2026-01-01T10:00:00.0000000Z",
        },
    }
    if client_state is not _MISSING:
        item["clientState"] = client_state
    return item


_MISSING = object()


def _post(items: list[dict[str, Any]]) -> func.HttpResponse:
    request = func.HttpRequest(
        method="POST",
        url="http://127.0.0.1:7071/api/presence",
        headers={"Content-Type": "application/json"},
        params={},
        body=json.dumps({"value": items}).encode(),
    )
    return presence_webhook(request)


WRONG = {
    "same length": "x" * len(SECRET),
    "one character off": SECRET[:-1] + ("0" if SECRET[-1] != "0" else "1"),
    "shorter (a prefix)": SECRET[:-1],
    "longer": SECRET + "0",
    "empty": "",
    "other case": SECRET.upper(),
    "not a string": 12345,
    "a list": [SECRET],
    "null": None,
    "missing": _MISSING,
    "non-ascii": SECRET[:-1] + "\u00e9",
}


@pytest.mark.parametrize("wrong", list(WRONG.values()), ids=list(WRONG))
def test_wrong_client_state_is_dropped_and_the_right_one_accepted(
    container: Container, wrong: Any
) -> None:
    response = _post([_item(wrong), _item(SECRET)])
    assert response.status_code == 202
    assert response.headers["x-enqueued"] == "1"
    assert response.headers["x-dropped"] == "1"


def test_comparison_is_constant_time(container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    original: Callable[[Any, Any], bool] = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    for value in (SECRET, "x" * len(SECRET), SECRET[:5]):
        _post([_item(value)])
    secret = SECRET.encode()
    compared = [(a, b) for a, b in calls if secret in (a, b)]
    # every one of the three values was compared with the secret through compare_digest
    assert len(compared) == 3, calls
    assert {a if b == secret else b for a, b in compared} == {
        secret,
        b"x" * len(SECRET),
        SECRET[:5].encode(),
    }
