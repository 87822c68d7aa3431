"""The presence and visits functions, called as the worker calls them (real func objects)."""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func
import pytest
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

from connector_core.bootstrap import Container
from connector_core.service.presence import POISON_QUEUE, PRESENCE_QUEUE
from functions.presence import (
    HOST_MAX_DEQUEUE_COUNT,
    presence_lifecycle,
    presence_renewal,
    presence_webhook,
    presence_worker,
)
from functions.visits import visit_participants
from tests.unit.presence_fakes import (
    ORGANIZER,
    VISIT_KEY,
    container_fixture,  # noqa: F401 (the "container" fixture)
    deliver,
    guest,
    item,
    queued,
    roster_event,
    store_of,
    user,
)


def post(route: str, body: bytes = b"", params: dict[str, str] | None = None) -> func.HttpRequest:
    return func.HttpRequest(
        method="POST",
        url=f"http://127.0.0.1/api/{route}",
        headers={"content-type": "application/json"},
        params=params or {},
        route_params={},
        body=body,
    )


TOKEN = "Validation: Testing client application reachability Nonce: a+b/c= &%"


@pytest.mark.parametrize("function", [presence_webhook, presence_lifecycle])
def test_validation_handshake_echoes_the_token(function: Any) -> None:
    response = function(post("presence", params={"validationToken": TOKEN}))
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_body().decode() == TOKEN


def test_oversized_validation_token_is_refused() -> None:
    response = presence_webhook(post("presence", params={"validationToken": "x" * 5000}))
    assert response.status_code == 400


def test_notifications_are_acknowledged_with_202(container: Container) -> None:
    body = {"value": [item(container, roster_event(1, joined=[guest("p1")])), {"junk": 1}]}
    response = presence_webhook(post("presence", json.dumps(body).encode()))
    assert response.status_code == 202
    assert response.headers["x-enqueued"] == "1" and response.headers["x-dropped"] == "1"
    assert len(queued(container)) == 1


@pytest.mark.parametrize("raw", [b"{oops", b"[]", b'{"value": 3}'])
def test_garbage_is_a_400_problem(container: Container, raw: bytes) -> None:
    response = presence_webhook(post("presence", raw))
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"


def queue_message(body: str, dequeue_count: int = 1) -> func.QueueMessage:
    return QueueMessage(id="m1", body=body.encode(), dequeue_count=dequeue_count)  # type: ignore[no-untyped-call]


def test_worker_processes_a_message(container: Container) -> None:
    presence_webhook(
        post(
            "presence",
            json.dumps({"value": [item(container, roster_event(1, joined=[guest("p")]))]}).encode(),
        )
    )
    (body,) = queued(container)
    container.queue.queues[PRESENCE_QUEUE].clear()  # type: ignore[attr-defined]
    presence_worker(queue_message(body))
    assert len(container.ehr_writer.audit_events) == 1  # type: ignore[attr-defined]


def test_worker_raises_for_the_host_to_retry(container: Container) -> None:
    presence_webhook(
        post(
            "presence",
            json.dumps({"value": [item(container, roster_event(1, joined=[guest("p")]))]}).encode(),
        )
    )
    (body,) = queued(container)
    from connector_core.errors import StorageUnavailableError

    down = StorageUnavailableError("Storage is unavailable (503).", status=503, code="ServerBusy")
    store_of(container).fail_next(down, operations=("list_entities",))
    with pytest.raises(StorageUnavailableError):
        presence_worker(queue_message(body))
    assert queued(container, POISON_QUEUE) == []


def test_the_hosts_last_try_parks_the_message_with_the_reason(container: Container) -> None:
    """On the last dequeue the worker itself moves the message to the poison queue, saying why,
    and returns (the host then deletes it) instead of the host moving it without a reason."""
    presence_webhook(
        post(
            "presence",
            json.dumps({"value": [item(container, roster_event(1, joined=[guest("p")]))]}).encode(),
        )
    )
    (body,) = queued(container)
    from connector_core.errors import StorageUnavailableError
    from connector_core.service.presence import PresenceBatch

    down = StorageUnavailableError("Storage is unavailable (503).", status=503, code="ServerBusy")
    store_of(container).fail_next(down, operations=("list_entities",))
    presence_worker(queue_message(body, dequeue_count=HOST_MAX_DEQUEUE_COUNT))
    (poisoned,) = queued(container, POISON_QUEUE)
    note = PresenceBatch.model_validate_json(poisoned).poisoned
    assert note is not None and (note.reason, note.status, note.code) == (
        "host_retries",
        503,
        "ServerBusy",
    )


def test_host_json_agrees_with_the_workers_last_try() -> None:
    from pathlib import Path

    host = json.loads((Path(__file__).parents[2] / "host.json").read_text())
    assert host["extensions"]["queues"]["maxDequeueCount"] == HOST_MAX_DEQUEUE_COUNT


def test_timer_function_runs(container: Container) -> None:
    presence_renewal(TimerRequest(past_due=False))


def get_view(
    headers: dict[str, str], params: dict[str, str] | None = None, key: str = VISIT_KEY
) -> func.HttpResponse:
    return visit_participants(
        func.HttpRequest(
            method="GET",
            url=f"http://127.0.0.1/api/visits/{key}/participants",
            headers=headers,
            params=params or {},
            route_params={"visitKey": key},
            body=b"",
        )
    )


def test_view_json_and_html_with_the_visit_cookie(container: Container) -> None:
    deliver(container, roster_event(1, joined=[user("p-doc", ORGANIZER), guest("p-pat")]))
    cookie = container.keyring.seal("visit-cookie", {"visit_key": VISIT_KEY}, ttl_seconds=60)
    headers = {"cookie": f"other=1; __Host-vv-visit={cookie}"}
    response = get_view(headers)
    assert response.status_code == 200 and response.mimetype == "application/json"
    view = json.loads(response.get_body())
    assert sorted(p["role"] for p in view["connected"]) == ["clinician", "patient"]
    page = get_view(headers, {"format": "html"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_body().decode()
    assert 'http-equiv="refresh"' in text and 'data-connected="2"' in text
    browser = get_view({**headers, "accept": "text/html,application/xhtml+xml"})
    assert browser.mimetype == "text/html"


def test_view_needs_credentials_before_any_lookup(container: Container) -> None:
    assert get_view({}).status_code == 401
    assert get_view({}, key="f" * 32).status_code == 401  # unknown visit: same answer
    html_error = get_view({}, {"format": "html"})
    assert html_error.status_code == 401 and html_error.mimetype == "text/html"
    cookie = container.keyring.seal("visit-cookie", {"visit_key": "b" * 32}, ttl_seconds=60)
    assert get_view({"cookie": f"__Host-vv-visit={cookie}"}).status_code == 403
    assert get_view({"cookie": f"__Host-vv-visit={cookie}"}, key="../etc").status_code == 404
