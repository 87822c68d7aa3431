"""functions/launch.py: real func.HttpRequest in, 302 / cookies / HTML pages out."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
import pytest

from connector_core.bootstrap import set_container
from functions import launch
from tests.unit.launch_fakes import FHIR, World, make_world


@pytest.fixture
def world() -> Iterator[World]:
    w = make_world()
    set_container(w.container)
    yield w
    set_container(None)


def _get(
    route: str, params: dict[str, str], *, cookies: str = "", **route_params: str
) -> func.HttpRequest:
    return func.HttpRequest(
        method="GET",
        url=f"http://127.0.0.1:7071/api/{route}",
        params=params,
        route_params=route_params,
        headers={"cookie": cookies} if cookies else {},
        body=b"",
    )


def _set_cookies(response: func.HttpResponse) -> list[str]:
    return [v for k, v in response.headers.items() if k.lower() == "set-cookie"]


def _cookie_header(set_cookies: list[str]) -> str:
    return "; ".join(c.split(";", 1)[0] for c in set_cookies)


def test_provider_launch_redirects_with_a_host_cookie(world: World) -> None:
    response = launch.launch_provider(
        _get("launch/provider/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    assert response.status_code == 302
    assert response.headers["Location"].startswith("https://ehr.example/oauth2/authorize?")
    assert response.headers["Cache-Control"] == "no-store"
    (cookie,) = _set_cookies(response)
    assert cookie.startswith("__Host-vvl-")
    for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax", "Max-Age=600"):
        assert attribute in cookie
    assert "Domain" not in cookie


def test_callback_sets_and_clears_several_cookies(world: World) -> None:
    world.map_clinician()
    start = launch.launch_provider(
        _get("launch/provider/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    state = parse_qs(urlsplit(start.headers["Location"]).query)["state"][0]
    response = launch.launch_callback(
        _get(
            "launch/callback",
            {"code": "c", "state": state},
            cookies=_cookie_header(_set_cookies(start)),
        )
    )
    assert response.status_code == 302
    assert response.headers["Location"].startswith("https://teams.example/")
    cookies = _set_cookies(response)
    assert len(cookies) == 2
    assert any(c.startswith("__Host-vvl-") and "Max-Age=0" in c for c in cookies)
    assert any(c.startswith("__Host-vv-visit=") for c in cookies)


def test_errors_are_friendly_pages_with_a_correlation_id(world: World) -> None:
    response = launch.launch_provider(
        _get(
            "launch/provider/x",
            {"iss": "https://evil.example/fhir", "launch": "L"},
            configId=world.config.id,
        )
    )
    assert response.status_code == 403
    assert response.mimetype == "text/html"
    page = response.get_body().decode()
    assert "does not trust" in page
    assert "EHR analyst" in page
    assert response.headers["x-correlation-id"] in page
    assert "Traceback" not in page


def test_forged_state_page(world: World) -> None:
    response = launch.launch_callback(_get("launch/callback", {"code": "c", "state": "AQforged"}))
    assert response.status_code == 401
    assert "not valid" in response.get_body().decode()


def test_waiting_page_refreshes_itself(world: World) -> None:
    world.smart.fhir_user = f"{FHIR}/Patient/p"
    start = launch.launch_patient(
        _get("launch/patient/x", {"iss": FHIR, "launch": "L"}, configId=world.config.id)
    )
    state = parse_qs(urlsplit(start.headers["Location"]).query)["state"][0]
    response = launch.launch_callback(
        _get(
            "launch/callback",
            {"code": "c", "state": state},
            cookies=_cookie_header(_set_cookies(start)),
        )
    )
    assert response.status_code == 200
    page = response.get_body().decode()
    assert 'http-equiv="refresh"' in page and "/api/launch/wait" in page
    wait_cookie = [c for c in _set_cookies(response) if c.startswith("__Host-vv-wait=")]
    assert wait_cookie
    again = launch.launch_wait(_get("launch/wait", {}, cookies=_cookie_header(wait_cookie)))
    assert again.status_code == 200


def test_cookie_parsing_takes_the_first_value() -> None:
    request = _get("launch/wait", {}, cookies='a=1; b="2"; a=3; junk')
    assert launch._cookies(request) == {"a": "1", "b": "2"}
