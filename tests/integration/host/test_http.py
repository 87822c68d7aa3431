"""HTTP triggers through the local host, over real HTTP on loopback."""

from __future__ import annotations

import logging
import time
import uuid

import httpx
import pytest

from devtools.host import LocalHost
from tests.integration.host import fixture_app


def test_route_param_query_headers_cookies_and_body_reach_the_function(
    client: httpx.Client, host: LocalHost
) -> None:
    resp = client.post(
        "/api/echo/alice",
        params=[("x", "1"), ("x", "2"), ("empty", "")],
        headers={"X-Custom": "yes", "Cookie": "a=1; b=2"},
        content=b'{"hello": "world"}',
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    data = resp.json()
    assert data["method"] == "POST"
    assert data["route"] == {"name": "alice"}
    assert data["params"] == {"x": "1,2", "empty": ""}
    assert data["headers"]["x-custom"] == "yes"
    assert data["headers"]["cookie"] == "a=1; b=2"
    assert data["body"] == '{"hello": "world"}'
    assert data["url"] == f"{host.url}/api/echo/alice?x=1&x=2&empty="


def test_route_values_are_percent_decoded(client: httpx.Client) -> None:
    resp = client.get("/api/echo/a%20b")
    assert resp.json()["route"] == {"name": "a b"}


def test_int_constraint_and_literal_precedence(client: httpx.Client) -> None:
    resp = client.get("/api/items/42")
    assert resp.json() == {"fn": "item_by_id", "route": {"id": "42"}}
    assert client.get("/api/items/abc").status_code == 404
    assert client.get("/api/items/special").json()["fn"] == "item_special"


def test_optional_segment_present_and_absent(client: httpx.Client) -> None:
    assert client.get("/api/opt/bob").json() == {"route": {"name": "bob"}}
    assert client.get("/api/opt").json() == {"route": {}}
    assert client.get("/api/opt/").json() == {"route": {}}
    assert client.get("/api/opt/bob/extra").status_code == 404


def test_catch_all_keeps_slashes(client: httpx.Client) -> None:
    assert client.get("/api/files/a/b/c.txt").json() == {"route": {"rest": "a/b/c.txt"}}
    assert client.get("/api/files").json() == {"route": {}}


def test_alpha_guid_bool_constraints(client: httpx.Client) -> None:
    guid = str(uuid.uuid4())
    resp = client.get(f"/api/typed/abc/{guid}/true")
    assert resp.json() == {"route": {"word": "abc", "id": guid, "flag": "true"}}
    assert client.get(f"/api/typed/ab1/{guid}/true").status_code == 404
    assert client.get("/api/typed/abc/not-a-guid/true").status_code == 404
    assert client.get(f"/api/typed/abc/{guid}/maybe").status_code == 404


def test_function_without_route_uses_its_name_case_insensitively(client: httpx.Client) -> None:
    resp = client.get("/api/plain")
    assert resp.status_code == 200
    assert resp.text == "hello"
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert client.get("/API/Plain").status_code == 200


def test_methods_405_and_unknown_404(client: httpx.Client) -> None:
    resp = client.get("/api/post-only")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "POST"
    assert client.post("/api/post-only").status_code == 201
    assert client.get("/api/no-such-function").status_code == 404
    assert client.get("/elsewhere/plain").status_code == 404


def test_several_set_cookie_headers(client: httpx.Client) -> None:
    resp = client.get("/api/cookies")
    assert resp.status_code == 200
    assert resp.headers.get_list("set-cookie") == [
        "__Host-a=1; Path=/; Secure; HttpOnly; SameSite=Lax",
        "b=2; Path=/; Max-Age=60",
    ]
    assert resp.headers["x-one"] == "1"
    assert resp.cookies["b"] == "2"


def test_exception_is_500_without_details(client: httpx.Client) -> None:
    resp = client.get("/api/boom")
    assert resp.status_code == 500
    assert resp.text == "Internal Server Error"
    assert "secret" not in resp.text
    # The host survives.
    assert client.get("/api/plain").status_code == 200


def test_async_function_with_context(client: httpx.Client) -> None:
    first = client.get("/api/async/ctx").json()
    second = client.get("/api/async/ctx").json()
    assert first["function_name"] == "async_ctx"
    assert uuid.UUID(first["invocation_id"])
    assert first["invocation_id"] != second["invocation_id"]


def test_access_log_has_no_query_string(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="devtools.host")
    client.get("/api/echo/logme", params={"code": "oauth-secret-code"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if "/api/echo/logme" in r.getMessage()]
        if lines:
            break
        time.sleep(0.02)
    assert lines and lines[0].startswith("GET /api/echo/logme 200 ")
    assert all("oauth-secret-code" not in r.getMessage() for r in caplog.records)


def test_admin_status_and_landing_page(client: httpx.Client) -> None:
    assert client.get("/admin/host/status").json()["state"] == "Running"
    assert client.get("/").status_code == 200
    names = {f["name"] for f in client.get("/admin/functions").json()}
    assert {"echo", "on_ok", "every_second", "async_ctx"} <= names


def test_prefix_body_limit_and_custom_headers() -> None:
    host_json = {
        "extensions": {
            "http": {
                "routePrefix": "v1",
                "maxRequestBodySize": 10,
                "customHeaders": {"X-Content-Type-Options": "nosniff"},
            }
        }
    }
    with (
        LocalHost(fixture_app.app, host_json=host_json, run_triggers=False) as local,
        httpx.Client(base_url=local.url) as http,
    ):
        assert local.api_url == f"{local.url}/v1"
        ok = http.post("/v1/echo/x", content=b"0123456789")
        assert ok.status_code == 200
        assert ok.headers["x-content-type-options"] == "nosniff"
        assert http.post("/v1/echo/x", content=b"0123456789A").status_code == 413
        assert http.get("/api/echo/x").status_code == 404
