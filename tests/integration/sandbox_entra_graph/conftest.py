"""Fixtures: one sandbox per package (real HTTPS/HTTP servers) and a tiny webhook receiver that
plays the connector's presence endpoints."""

from __future__ import annotations

import base64
import html
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from devtools._serve import ServerThread
from devtools.dev_secrets import new_self_signed_cert
from devtools.sandbox import Sandbox
from devtools.sandbox.entra import CONTOSO_TID, FABRIKAM_TID


@dataclass
class Received:
    path: str
    body: Any
    at: float = field(default_factory=time.monotonic)


class Receiver:
    """Plays the connector's ``/api/presence`` and ``/api/presence/lifecycle`` webhooks."""

    def __init__(self) -> None:
        self.validation_tokens: list[tuple[str, str]] = []  # (path, decoded token)
        self.validation_content_types: list[str] = []
        self.received: list[Received] = []
        self.fail_next = 0  # answer this many notifications with 500
        self.bad_echo = False  # answer validation with a wrong body
        self._cond = threading.Condition()
        routes = [
            Route("/api/presence", self._handle, methods=["POST"]),
            Route("/api/presence/lifecycle", self._handle, methods=["POST"]),
        ]
        self.server = ServerThread(Starlette(routes=routes), name="test-receiver")
        self.url = self.server.url

    async def _handle(self, request: Request) -> Response:
        token = request.query_params.get("validationToken")
        if token is not None:
            with self._cond:
                self.validation_tokens.append((request.url.path, token))
                self.validation_content_types.append(request.headers.get("content-type", ""))
            return PlainTextResponse("not the token" if self.bad_echo else token)
        with self._cond:
            if self.fail_next > 0:
                self.fail_next -= 1
                return Response(status_code=500)
        body = await request.json()
        with self._cond:
            self.received.append(Received(request.url.path, body))
            self._cond.notify_all()
        return Response(status_code=202)

    def items(self, path: str = "/api/presence") -> list[dict[str, Any]]:
        with self._cond:
            return [item for r in self.received if r.path == path for item in r.body["value"]]

    def wait_items(
        self,
        count: int,
        *,
        path: str = "/api/presence",
        subscription_id: str | None = None,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                items = [
                    i
                    for r in self.received
                    if r.path == path
                    for i in r.body["value"]
                    if subscription_id is None or i["subscriptionId"] == subscription_id
                ]
                if len(items) >= count:
                    return items
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(items)} of {count} notifications received")
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self.validation_tokens.clear()
            self.validation_content_types.clear()
            self.received.clear()
            self.fail_next = 0
            self.bad_echo = False


@pytest.fixture(scope="package")
def receiver() -> Iterator[Receiver]:
    instance = Receiver()
    instance.server.start()
    yield instance
    instance.server.stop()


@pytest.fixture(scope="package")
def sandbox(receiver: Receiver) -> Iterator[Sandbox]:
    with Sandbox(connector_url=receiver.url) as instance:
        instance.graph.retry_delays = (0.05, 0.1)
        yield instance


@pytest.fixture(autouse=True)
def _clean(sandbox: Sandbox, receiver: Receiver) -> Iterator[None]:
    yield
    sandbox.graph.wait_idle(10)
    sandbox.reset()
    receiver.clear()


@pytest.fixture
def https(sandbox: Sandbox) -> Iterator[httpx.Client]:
    """An httpx client that trusts the sandbox CA (follow_redirects off, like a careful test)."""
    with httpx.Client(verify=ca_context(sandbox), timeout=10) as client:
        yield client


@pytest.fixture
def msal_trust(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """msal uses requests, which reads REQUESTS_CA_BUNDLE."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sandbox.ca_bundle))


@pytest.fixture
def contoso() -> str:
    return CONTOSO_TID


@pytest.fixture
def fabrikam() -> str:
    return FABRIKAM_TID


def ca_context(sandbox: Sandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sandbox.ca_bundle))


def graph_token(sandbox: Sandbox, tid: str) -> str:
    """Client credentials at the Entra stand-in's token endpoint, over HTTPS."""
    response = httpx.post(
        sandbox.entra.token_endpoint(tid),
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.entra.client_id,
            "client_secret": sandbox.entra.client_secret,
            "scope": "https://graph.microsoft.com/.default",
        },
        verify=ca_context(sandbox),
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


@pytest.fixture
def contoso_graph(sandbox: Sandbox, contoso: str) -> httpx.Client:
    token = graph_token(sandbox, contoso)
    return httpx.Client(
        base_url=sandbox.graph_url, headers={"Authorization": f"Bearer {token}"}, timeout=15
    )


def account_links(page: str) -> dict[str, str]:
    """UPN -> href of the account picker's links."""
    links = re.findall(r'<a class="account[^"]*" data-upn="([^"]+)"[^>]*href="([^"]+)"', page)
    return {html.unescape(upn): html.unescape(href) for upn, href in links}


@dataclass
class EncryptionCert:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def b64_der(self) -> str:
        return base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()


@pytest.fixture(scope="package")
def encryption_cert() -> EncryptionCert:
    key, cert = new_self_signed_cert("connector notifications", days=30)
    return EncryptionCert(key, cert)
