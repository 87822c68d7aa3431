"""Queue triggers against real Azurite, timers by schedule and through the admin endpoint."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from devtools.azurite import Azurite
from devtools.host import LocalHost
from tests.integration.host import fixture_app


@pytest.fixture
def queues(azurite: Azurite) -> Iterator[dict[str, QueueClient]]:
    names = [fixture_app.QUEUE_OK, fixture_app.QUEUE_FAIL, f"{fixture_app.QUEUE_FAIL}-poison"]
    names.append(f"{fixture_app.QUEUE_OK}-poison")
    clients = {
        name: QueueClient.from_connection_string(
            azurite.connection_string, name, message_encode_policy=TextBase64EncodePolicy()
        )
        for name in names
    }
    yield clients
    for client in clients.values():
        client.close()


def _wait_for_message(client: QueueClient, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            peeked = client.peek_messages(max_messages=1)
        except Exception:
            peeked = []
        if peeked:
            return str(peeked[0].content)
        time.sleep(0.1)
    raise AssertionError(f"no message in {client.queue_name} within {timeout}s")


def _assert_empties(queue: QueueClient, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while queue.get_queue_properties().approximate_message_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.get_queue_properties().approximate_message_count == 0


def test_queue_message_is_delivered_and_deleted(
    host: LocalHost, queues: dict[str, QueueClient]
) -> None:
    queue = queues[fixture_app.QUEUE_OK]
    queue.send_message('{"event": "connected"}')
    items = fixture_app.received.wait_for(
        lambda xs: any(x["body"] == '{"event": "connected"}' for x in xs)
    )
    item = next(x for x in items if x["body"] == '{"event": "connected"}')
    assert item["dequeue_count"] == 1
    assert item["id"] and item["pop_receipt"] and item["insertion_time"] is not None
    _assert_empties(queue)


def test_failing_message_goes_to_poison_after_max_dequeue_count(
    host: LocalHost, queues: dict[str, QueueClient]
) -> None:
    queues[fixture_app.QUEUE_FAIL].send_message("doomed")
    content = _wait_for_message(queues[f"{fixture_app.QUEUE_FAIL}-poison"])
    # The poison copy is the original stored message (still base64).
    assert content == "ZG9vbWVk"
    assert fixture_app.failures.items()[-3:] == [1, 2, 3]
    # The host copies to the poison queue first, then deletes the original (nothing lost if it
    # stops in between), so the original may still be there a moment after the copy shows.
    _assert_empties(queues[fixture_app.QUEUE_FAIL])


def test_message_that_is_not_base64_is_poisoned_without_invoking(
    host: LocalHost, azurite: Azurite
) -> None:
    before = len(fixture_app.received.items())
    with QueueClient.from_connection_string(
        azurite.connection_string, fixture_app.QUEUE_OK
    ) as raw_client:
        raw_client.send_message("not base64 !!")
    poison = QueueClient.from_connection_string(
        azurite.connection_string, f"{fixture_app.QUEUE_OK}-poison"
    )
    with poison:
        assert _wait_for_message(poison) == "not base64 !!"
    assert len(fixture_app.received.items()) == before


def test_queue_output_binding_feeds_the_queue_trigger(
    client: httpx.Client, host: LocalHost
) -> None:
    assert client.post("/api/enqueue", content=b"from-http").status_code == 202
    fixture_app.received.wait_for(lambda xs: any(x["body"] == "from-http" for x in xs))


def test_admin_endpoint_fires_timer_and_queue_functions(client: httpx.Client) -> None:
    before = len(fixture_app.manual.items())
    resp = client.post("/admin/functions/yearly", json={"input": ""})
    assert resp.status_code == 202
    items = fixture_app.manual.wait_for(lambda xs: len(xs) > before, timeout=5)
    assert items[-1] == {"past_due": False, "function_name": "yearly"}

    resp = client.post("/admin/functions/on_ok", json={"input": "via-admin"})
    assert resp.status_code == 202
    fixture_app.received.wait_for(lambda xs: any(x["body"] == "via-admin" for x in xs), 5)

    assert client.post("/admin/functions/nope", json={}).status_code == 404
    assert client.post("/admin/functions/echo", json={}).status_code == 400


def test_run_function_is_synchronous(host: LocalHost) -> None:
    before = len(fixture_app.manual.items())
    host.run_function("yearly")
    assert len(fixture_app.manual.items()) == before + 1
    with pytest.raises(ValueError, match="always fails"):
        host.run_function("on_fail", "x")


def test_timer_fires_on_its_schedule(host: LocalHost) -> None:
    start = len(fixture_app.ticks.items())
    items = fixture_app.ticks.wait_for(lambda xs: len(xs) >= start + 2, timeout=4)
    assert all(isinstance(tick["past_due"], bool) for tick in items[start:])


def test_unreachable_storage_neither_breaks_http_nor_slows_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from devtools._serve import free_port

    dead = free_port()
    monkeypatch.setenv(
        fixture_app.STORAGE_SETTING,
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
        f"KBHBeksoGMGw==;QueueEndpoint=http://127.0.0.1:{dead}/devstoreaccount1;",
    )
    local = LocalHost(fixture_app.app, host_json={}).start()
    try:
        time.sleep(0.5)
        assert httpx.get(f"{local.api_url}/plain").status_code == 200
    finally:
        started = time.monotonic()
        local.stop()
    assert time.monotonic() - started < 5
