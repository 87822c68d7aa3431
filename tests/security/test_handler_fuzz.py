"""Hypothesis over the HTTP handlers the OpenAPI fuzz (tests/integration/portal/
test_portal_fuzz.py, schemathesis) does not reach: the Graph webhook, the launch browser routes
and the participants view. Real ``func.HttpRequest`` objects into the registered functions over
an in-memory container with the launch fakes; bounded example counts, derandomized for CI.

Properties: never a 5xx; JSON routes answer problem+json on errors; browser routes answer HTML
pages; every redirect goes to the fake EHR's authorization endpoint or the fake Entra sign-in
(never to something from the request); no header value carries a line break.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import azure.functions as func
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from connector_core.bootstrap import reset_container, set_container
from functions.launch import (
    launch_callback,
    launch_patient,
    launch_provider,
    launch_sso_callback,
    launch_wait,
)
from functions.presence import presence_lifecycle, presence_webhook
from functions.visits import visit_participants
from tests.unit.launch_fakes import FHIR, World, make_world

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
TRUSTED_REDIRECTS = ("https://ehr.example/oauth2/authorize?", "https://login.example/")

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=25,
)
_notification_item = st.fixed_dictionaries(
    {},
    optional={
        "subscriptionId": st.text(max_size=40) | st.integers() | st.none(),
        "clientState": st.text(max_size=40) | st.integers() | st.none(),
        "tenantId": st.text(max_size=40),
        "changeType": st.sampled_from(["updated", "created", "deleted", ""]),
        "lifecycleEvent": st.sampled_from(
            ["reauthorizationRequired", "subscriptionRemoved", "missed", "x"]
        ),
        "resourceData": _json,
        "encryptedContent": _json,
    },
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.lists(_notification_item | _json, max_size=6).map(
        lambda items: json.dumps({"value": items}).encode()
    ),
)
_param_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60
) | st.sampled_from(
    [
        FHIR,
        FHIR.upper() + "/",
        "https://evil.example/fhir/r4",
        "//evil.example",
        "javascript:alert(1)",
        "x\r\nLocation: https://evil.example",
        "%0d%0aSet-Cookie:a=b",
    ]
)
_params = st.dictionaries(
    st.sampled_from(
        ["iss", "launch", "code", "state", "error", "redirect_uri", "next", "returnUrl", "format"]
    ),
    _param_text,
    max_size=6,
)
_cookie_names = st.sampled_from(
    ["__Host-vv-sso", "__Host-vv-wait", "__Host-vv-visit", "__Host-vvl-abc", "other"]
)
_cookies = st.dictionaries(
    _cookie_names,
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";,"), max_size=80
    ),
    max_size=3,
)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = make_world()
    w.map_clinician()
    set_container(w.container)
    yield w
    reset_container()


def _request(
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: bytes = b"",
    cookies: dict[str, str] | None = None,
    route_params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> func.HttpRequest:
    sent = dict(headers or {})
    if cookies:
        sent["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    query = f"?{urlencode(params)}" if params else ""
    return func.HttpRequest(
        method=method,
        url=f"http://127.0.0.1:7071/api/{path}{query}",
        headers=sent,
        params=params or {},
        route_params=route_params or {},
        body=body,
    )


def _sane(response: func.HttpResponse, *, browser: bool) -> None:
    assert response.status_code < 500, (response.status_code, response.get_body()[:300])
    for name, value in response.headers.items():
        assert "\r" not in value and "\n" not in value, (name, value)
    if 300 <= response.status_code < 400:
        location = response.headers["Location"]
        assert location.startswith(TRUSTED_REDIRECTS), location
    elif response.status_code >= 400:
        kind = response.mimetype
        assert kind == ("text/html" if browser else "application/problem+json"), kind
        assert b"Traceback" not in response.get_body()


@FUZZ
@given(body=_bodies, lifecycle=st.booleans(), token=st.none() | _param_text)
def test_webhook_never_fails_with_a_5xx(
    world: World, body: bytes, lifecycle: bool, token: str | None
) -> None:
    handler = presence_lifecycle if lifecycle else presence_webhook
    params = {"validationToken": token} if token is not None else {}
    response = handler(_request("POST", "presence", params=params, body=body))
    _sane(response, browser=False)
    if token is not None and response.status_code == 200:
        assert response.get_body().decode() == token  # the handshake echoes, as text/plain
        assert response.mimetype == "text/plain"


@FUZZ
@given(
    route=st.sampled_from(["provider", "patient", "callback", "sso-callback", "wait"]),
    params=_params,
    cookies=_cookies,
    config_id=st.none() | st.text(max_size=70),
)
@example(  # a launch that goes through: the redirect itself is checked too
    route="provider",
    params={"iss": FHIR, "launch": "L", "next": "//evil.example", "redirect_uri": "https://e.x"},
    cookies={},
    config_id=None,
)
def test_launch_routes_never_fail_and_redirect_only_to_trusted_places(
    world: World,
    route: str,
    params: dict[str, str],
    cookies: dict[str, str],
    config_id: str | None,
) -> None:
    handlers: dict[str, Any] = {
        "provider": launch_provider,
        "patient": launch_patient,
        "callback": launch_callback,
        "sso-callback": launch_sso_callback,
        "wait": launch_wait,
    }
    route_params = {}
    if route in ("provider", "patient"):
        route_params["configId"] = world.config.id if config_id is None else config_id
    response = handlers[route](
        _request(
            "GET",
            f"launch/{route}",
            params=params,
            cookies=cookies,
            route_params=route_params,
        )
    )
    _sane(response, browser=True)


@FUZZ
@given(
    key=st.text(max_size=70) | st.just("ab" * 32),
    params=_params,
    cookies=_cookies,
    authorization=st.none() | st.text(max_size=60).map(lambda t: "Bearer " + t),
    accept=st.sampled_from(["application/json", "text/html", "*/*"]),
)
def test_participants_view_never_fails(
    world: World,
    key: str,
    params: dict[str, str],
    cookies: dict[str, str],
    authorization: str | None,
    accept: str,
) -> None:
    headers = {"accept": accept}
    if authorization:
        headers["authorization"] = authorization
    response = visit_participants(
        _request(
            "GET",
            f"visits/{key}/participants",
            params=params,
            cookies=cookies,
            route_params={"visitKey": key},
            headers=headers,
        )
    )
    assert response.status_code < 500, response.get_body()[:300]
    assert response.status_code in (200, 400, 401, 403, 404)
