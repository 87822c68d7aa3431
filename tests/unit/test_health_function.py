"""The health function, called as the Functions worker calls it: with a real func.HttpRequest."""

from __future__ import annotations

import json
from collections.abc import Iterator

import azure.functions as func
import pytest

from connector_core.bootstrap import Container, reset_container, set_container
from connector_core.errors import StorageUnavailableError
from functions.health import health
from tests.helpers import in_memory_container, make_settings


@pytest.fixture(autouse=True)
def _isolated_container() -> Iterator[None]:
    yield
    reset_container()


def get(
    url: str = "http://127.0.0.1/api/health", headers: dict[str, str] | None = None
) -> func.HttpRequest:
    return func.HttpRequest(
        method="GET", url=url, headers=headers or {}, params={}, route_params={}, body=b""
    )


def test_health_reports_region_and_version() -> None:
    set_container(in_memory_container(CONNECTOR_REGION="apac"))
    response = health(get())
    assert response.status_code == 200
    body = json.loads(response.get_body())
    assert body == {"status": "ok", "region": "apac", "version": "0.1.0"}
    assert response.headers["x-correlation-id"]


class _DownStore:
    def ping(self) -> None:
        raise StorageUnavailableError(
            "Storage is unavailable (ServiceRequestError); try again shortly."
        )


def test_health_is_503_problem_when_storage_is_down() -> None:
    container = in_memory_container()
    container.health_store = _DownStore()  # type: ignore[assignment]
    set_container(container)
    response = health(get(headers={"x-correlation-id": "abc-12345678"}))
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    problem = json.loads(response.get_body())
    assert problem["status"] == 503 and problem["correlationId"] == "abc-12345678"
    assert "Traceback" not in response.get_body().decode()


def test_unexpected_error_is_a_500_problem_without_traceback() -> None:
    container = in_memory_container()

    class Boom:
        def ping(self) -> None:
            raise RuntimeError("secret internals")

    container.health_store = Boom()  # type: ignore[assignment]
    set_container(container)
    response = health(get())
    assert response.status_code == 500
    text = response.get_body().decode()
    assert "secret internals" not in text and "Traceback" not in text
    assert json.loads(text)["correlationId"]


def test_settings_error_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_container()
    for key in list(__import__("os").environ):
        if key.startswith(("CONNECTOR_", "ENTRA_", "SMART_", "GRAPH_")):
            monkeypatch.delenv(key)
    response = health(get())
    assert response.status_code == 500
    assert "CONNECTOR_REGION" in json.loads(response.get_body())["detail"]


def test_health_against_unreachable_storage_is_503() -> None:
    settings = make_settings(
        CONNECTOR_STORAGE="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    )
    set_container(Container.from_settings(settings))
    response = health(get())
    assert response.status_code == 503


def test_jwks_publishes_public_keys_only() -> None:
    from functions.wellknown import jwks

    container = in_memory_container()
    set_container(container)
    response = jwks(get("http://127.0.0.1/api/.well-known/jwks.json"))
    assert response.status_code == 200
    keys = json.loads(response.get_body())["keys"]
    assert [k["kid"] for k in keys] == [container.signing_keys.active_kid]
    assert all("d" not in k and k["alg"] == "RS384" for k in keys)
