"""Every local server (devtools._serve.ServerThread: the local Functions host, the sandbox EHR,
Entra and Graph stand-ins) sets TCP_NODELAY on the connections it accepts.

Without it Nagle's algorithm holds back a response's body (uvicorn writes the head and the body
separately) until the client ACKs the head, which the client delays by up to ~40 ms: a stall on
every request of a reused keep-alive connection. The tests look at the socket option of the
ACCEPTED connections (the server's side), not at a timing.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import pytest

from devtools._serve import ServerThread
from devtools.sandbox.tls import SandboxTls, ensure_tls


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"b")]})
    await send({"type": "http.response.body", "body": b"hello"})


def _accepted(server: ServerThread) -> list[Any]:
    """The sockets of the uvicorn server's live (accepted) connections."""
    connections = list(server._server.server_state.connections)
    return [c.transport.get_extra_info("socket") for c in connections]


def _assert_nodelay(server: ServerThread, client: httpx.Client, url: str) -> None:
    for _ in range(3):  # keep-alive: one connection, reused
        assert client.get(url).status_code < 500
    sockets = _accepted(server)
    assert sockets, "the keep-alive connection should still be open on the server"
    for sock in sockets:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.fixture
def tls(tmp_path: Path) -> SandboxTls:
    return ensure_tls(tmp_path / "tls")


def test_accepted_http_connections_have_tcp_nodelay() -> None:
    with ServerThread(_app, name="nodelay-http") as server, httpx.Client() as client:
        _assert_nodelay(server, client, f"{server.url}/")


def test_accepted_https_connections_have_tcp_nodelay(tls: SandboxTls) -> None:
    with (
        ServerThread(
            _app,
            certfile=str(tls.server_cert),
            keyfile=str(tls.server_key),
            name="nodelay-https",
        ) as server,
        httpx.Client(verify=ssl.create_default_context(cafile=str(tls.ca_cert))) as client,
    ):
        _assert_nodelay(server, client, f"{server.url}/")


def test_the_local_functions_host_sets_tcp_nodelay() -> None:
    from devtools.host import LocalHost

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="ping", methods=["GET"])
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")

    host = LocalHost(app, port=0, run_triggers=False, log_requests=False).start()
    try:
        with httpx.Client() as client:
            _assert_nodelay(host._server, client, f"{host.url}/api/ping")
    finally:
        host.stop()


def _open_without_finishing(url: str, context: ssl.SSLContext) -> socket.socket:
    """A connection (TLS handshake done for https) with half a request sent: the server holds
    it open whatever it does after a response (the Entra stand-in closes every connection)."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
    if url.startswith("https:"):
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def test_the_sandbox_servers_set_tcp_nodelay() -> None:
    from devtools.sandbox import Sandbox

    with Sandbox(connector_url="http://127.0.0.1:9") as sandbox:
        context = ssl.create_default_context(cafile=str(sandbox.ca_bundle))
        for server in (sandbox._ehr_server, sandbox._entra_server, sandbox._graph_server):
            with _open_without_finishing(server.url, context):
                deadline = time.monotonic() + 5
                while not _accepted(server) and time.monotonic() < deadline:
                    time.sleep(0.01)
                sockets = _accepted(server)
                assert sockets, server.url
                for sock in sockets:
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
