"""Discovery that points the token endpoint and the JWKS at a loopback canary, with dev mode
off: the guarded EHR client (connector_core.adapters.ehr_http) must never connect to it.

Adapter level, because the session's connector runs in dev mode: a ``SmartClient`` on a
``guarded_client(EhrTargetPolicy(dev_mode=False, private_targets=...))`` where the only private
target allowed is the conformance server's exact address and port (as an operator would set
``CONNECTOR_EHR_PRIVATE_TARGETS`` for an EHR reachable on a private network).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from connector_core.adapters import ehr_http
from connector_core.domain.scopes import BACKEND_SERVICES_SCOPES, scope_string
from connector_core.errors import PermissionDeniedError
from devtools._serve import free_port
from devtools.conformance import ConformanceServer
from tests.stack import Stack

pytestmark = pytest.mark.slow

SCOPE = scope_string(BACKEND_SERVICES_SCOPES)


class Canary:
    """A plain TCP listener on 127.0.0.1 that counts every connection made to it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary()
    yield listener
    listener.close()


def _smart(stack: Stack, cs: ConformanceServer, *, private_targets: str) -> tuple[Any, Any]:
    """A SmartClient and its guarded httpx client, dev mode off."""
    from connector_core.adapters.smart import SmartClient

    policy = ehr_http.EhrTargetPolicy(
        dev_mode=False, private_targets=ehr_http.parse_private_targets(private_targets)
    )
    http = ehr_http.guarded_client(
        policy, ssl_context=ssl.create_default_context(cafile=str(cs.tls.ca_bundle))
    )
    smart = SmartClient(http=http, signing_keys=stack.container().signing_keys, policy=policy)
    return smart, http


def _foreign_id_token(issuer: str, client_id: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": "x",
        "aud": client_id,
        "exp": now + 300,
        "iat": now,
        "nonce": "n",
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "canary"})


def test_private_target_allowance_reaches_exactly_this_server_with_dev_mode_off(
    fresh_stack: Stack, cs: ConformanceServer
) -> None:
    client_id = fresh_stack.container().settings.smart_client_id
    smart, _ = _smart(fresh_stack, cs, private_targets=f"127.0.0.1:{cs.port}")
    configuration = smart.get_configuration(cs.fhir_base)
    assert configuration.issuer == cs.issuer
    assert smart.backend_token(configuration, client_id=client_id, scope=SCOPE)

    # Without the allowance (or with another port) the loopback FHIR base itself is refused
    # before any connection: the server sees no discovery request.
    cs.reset()
    for targets in ("", f"127.0.0.1:{free_port()}", "127.0.0.2"):
        smart, _ = _smart(fresh_stack, cs, private_targets=targets)
        with pytest.raises(PermissionDeniedError):
            smart.get_configuration(cs.fhir_base)
    assert cs.fhir_requests() == []


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://127.0.0.1:{port}/token",
        "http://127.0.0.1:{port}/token",
        "https://localhost:{port}/token",
    ],
)
def test_discovery_pointing_at_a_loopback_canary_never_reaches_it(
    fresh_stack: Stack, cs: ConformanceServer, canary: Canary, endpoint: str
) -> None:
    container = fresh_stack.container()
    client_id = container.settings.smart_client_id
    target = endpoint.format(port=canary.port)
    cs.set_discovery(token_endpoint=target, jwks_uri=target.replace("/token", "/jwks"))

    smart, http = _smart(fresh_stack, cs, private_targets=f"127.0.0.1:{cs.port}")
    try:
        configuration = smart.get_configuration(cs.fhir_base)
    except PermissionDeniedError:
        configuration = None  # refused while reading discovery: fine, nothing was called
    if configuration is not None:
        with pytest.raises(PermissionDeniedError):
            smart.backend_token(configuration, client_id=client_id, scope=SCOPE)
        with pytest.raises(PermissionDeniedError):
            smart.exchange_code(
                configuration,
                client_id=client_id,
                code="code",
                redirect_uri=f"{fresh_stack.api}/launch/callback",
                code_verifier="v" * 43,
            )
        with pytest.raises(PermissionDeniedError):
            smart.validate_id_token(
                configuration,
                _foreign_id_token(cs.issuer, client_id),
                client_id=client_id,
                nonce="n",
            )

    from connector_core.adapters.ehr_writeback import EhrWriter

    writer = EhrWriter(http=http, tokens=smart)
    with pytest.raises(PermissionDeniedError):
        writer.backend_token(cs.fhir_base, client_id=client_id, scope=SCOPE)

    time.sleep(0.2)  # a connection attempt in flight would have been accepted by now
    assert canary.connections == 0
    assert not [r for r in cs.token_requests()]  # nor did anything reach the real endpoint
