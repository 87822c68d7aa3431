"""The stack itself: health over real HTTP, JWKS reachable by the EHR, browser cookie policy."""

from __future__ import annotations

from tests.stack import Stack


def test_health_over_http_reports_region(stack: Stack) -> None:
    with stack.http() as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["region"] == "americas"
    assert response.headers["content-type"].startswith("application/json")


def test_jwks_served_for_the_ehr(stack: Stack) -> None:
    with stack.http() as client:
        keys = client.get("/.well-known/jwks.json").json()["keys"]
    assert keys
    assert keys[0]["alg"] == "RS384"
    assert keys[0]["kid"] == stack.container().signing_keys.active_kid


def test_browser_client_behaves_like_a_browser_with_secure_cookies() -> None:
    """Browsers treat http://127.0.0.1 as a secure context: Secure cookies set there come back."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    from devtools._serve import ServerThread
    from tests.stack import Browser

    def set_cookie(request: Request) -> RedirectResponse:
        response = RedirectResponse("/echo", status_code=302)
        response.headers.append("set-cookie", "__Host-t=v; Secure; HttpOnly; Path=/; SameSite=Lax")
        return response

    def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.headers.get("cookie", ""))

    app = Starlette(routes=[Route("/set", set_cookie), Route("/echo", echo)])
    with ServerThread(app) as server:
        browser = Browser()
        assert browser.get(f"{server.url}/set").text == "__Host-t=v"
        browser.close()
