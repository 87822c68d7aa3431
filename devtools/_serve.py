"""Run an ASGI app with uvicorn on a loopback socket in a background thread.

Shared by the local Functions host and the sandbox servers. The socket is bound before the
thread starts, so ``url`` is known (and correct) as soon as the object exists.

The listening socket is made with ``proto=IPPROTO_TCP``, not the default 0: accepted sockets
inherit the listener's ``proto``, and asyncio sets ``TCP_NODELAY`` on an accepted connection only
when ``proto == IPPROTO_TCP``. Without it, Nagle's algorithm holds back the response body (uvicorn
writes the head and the body separately) until the client ACKs the head, which a client delays
by up to ~40 ms: every request on a reused keep-alive connection can stall that long.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

__all__ = ["ServerThread", "free_port"]


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature; prefer ServerThread(port=0))."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` (0 picks a free port) in a daemon thread."""

    def __init__(
        self,
        app: Any,
        *,
        port: int = 0,
        certfile: str | None = None,
        keyfile: str | None = None,
        log_level: str = "warning",
        name: str = "server",
    ) -> None:
        # IPPROTO_TCP, so asyncio sets TCP_NODELAY on every accepted connection (see above)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = int(self._sock.getsockname()[1])
        scheme = "https" if certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            lifespan="off",
            timeout_keep_alive=30,
            backlog=2048,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self, *, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} failed to start on {self.url}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._thread.name} did not start within {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
