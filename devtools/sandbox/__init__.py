"""The local sandbox: a SMART EHR, an Entra ID stand-in (HTTPS) and a Graph/Teams stand-in.

Used by ``make run`` (a person clicks through a demo) and by the integration/e2e tests::

    with Sandbox(connector_url="http://127.0.0.1:7071") as sandbox:
        os.environ.update(sandbox.connector_settings())
        ...  # sandbox.ehr / sandbox.entra / sandbox.graph, their URLs and test hooks

Each server runs in a :class:`devtools._serve.ServerThread` on a free loopback port. The Entra
stand-in is served over HTTPS with a local CA (:mod:`devtools.sandbox.tls`); clients trust it
through ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE`` (both in :meth:`Sandbox.connector_settings`).
Each stand-in's handler time is added to ``Sandbox.timing`` (:mod:`devtools._timing`, labels
``ehr``, ``entra``, ``graph``), so a benchmark can tell the stand-ins' own time from the
connector's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from devtools._serve import ServerThread
from devtools._timing import HandlerClock, timed
from devtools.sandbox.entra import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxEntra
from devtools.sandbox.graph import SandboxGraph
from devtools.sandbox.tls import SandboxTls, ensure_tls

if TYPE_CHECKING:
    from devtools.sandbox.ehr import SandboxEhr

__all__ = ["DEFAULT_ENTRA_CLIENT_ID", "DEFAULT_ENTRA_CLIENT_SECRET", "Sandbox"]

DEFAULT_ENTRA_CLIENT_ID = DEFAULT_CLIENT_ID
DEFAULT_ENTRA_CLIENT_SECRET = DEFAULT_CLIENT_SECRET


class Sandbox:
    """EHR + Entra + Graph stand-ins, wired to one connector URL. A context manager."""

    def __init__(
        self,
        *,
        connector_url: str,
        smart_client_id: str = "vv-connector-local",
        entra_client_id: str = DEFAULT_ENTRA_CLIENT_ID,
        entra_client_secret: str = DEFAULT_ENTRA_CLIENT_SECRET,
        connector_jwks_url: str | None = None,
        state_dir: Path | None = None,
        portal_redirect_uris: tuple[str, ...] = (),
        ehr_port: int = 0,
        entra_port: int = 0,
        graph_port: int = 0,
    ) -> None:
        from devtools.sandbox.ehr import SandboxEhr

        self.connector_url = connector_url.rstrip("/")
        self.smart_client_id = smart_client_id
        self.connector_jwks_url = (
            connector_jwks_url or f"{self.connector_url}/api/.well-known/jwks.json"
        )
        self._own_state_dir = state_dir is None
        self.state_dir = (
            Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="vv-sandbox-"))
        )
        self.tls: SandboxTls = ensure_tls(self.state_dir / "sandbox-tls")
        self.ca_bundle: Path = self.tls.ca_bundle
        self.ehr: SandboxEhr = SandboxEhr(
            connector_url=self.connector_url,
            smart_client_id=smart_client_id,
            connector_jwks_url=self.connector_jwks_url,
        )
        self.entra = SandboxEntra(
            client_id=entra_client_id,
            client_secret=entra_client_secret,
            redirect_uris=[f"{self.connector_url}/api/launch/sso-callback", *portal_redirect_uris],
        )
        self.graph = SandboxGraph(entra=self.entra)
        self.timing = HandlerClock()  # the stand-ins' own handler time (for benchmarks)
        self._ehr_server = ServerThread(
            timed(self.ehr.app, self.timing, "ehr"), port=ehr_port, name="sandbox-ehr"
        )
        self._entra_server = ServerThread(
            timed(self.entra.app, self.timing, "entra"),
            port=entra_port,
            certfile=str(self.tls.server_cert),
            keyfile=str(self.tls.server_key),
            name="sandbox-entra",
        )
        self._graph_server = ServerThread(
            timed(self.graph.app, self.timing, "graph"), port=graph_port, name="sandbox-graph"
        )
        self.ehr_url: str = self._ehr_server.url
        self.entra_url: str = self._entra_server.url
        self.graph_url: str = self._graph_server.url
        self.ehr.set_base_url(self.ehr_url)
        self.entra.set_base_url(self.entra_url)
        self.graph.set_base_url(self.graph_url)
        self._started: list[ServerThread] = []

    def start(self) -> Sandbox:
        try:
            for server in (self._ehr_server, self._entra_server, self._graph_server):
                server.start()
                self._started.append(server)
            self.graph.start_delivery()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.graph.close()
        while self._started:
            self._started.pop().stop()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def fhir_base(self) -> str:
        return self.ehr.fhir_base

    def connector_settings(self) -> dict[str, str]:
        """Settings (environment variables) that point the connector at this sandbox."""
        return {
            "ENTRA_AUTHORITY_HOST": self.entra_url,
            "ENTRA_CLIENT_ID": self.entra.client_id,
            "ENTRA_CLIENT_SECRET": self.entra.client_secret,
            "GRAPH_BASE_URL": self.graph_url,
            "SMART_CLIENT_ID": self.smart_client_id,
            "SSL_CERT_FILE": str(self.ca_bundle),
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
        }

    def reset(self) -> None:
        """Clear faults and test hooks of all three stand-ins (between tests)."""
        self.entra.reset()
        self.graph.reset()
        reset = getattr(self.ehr, "reset", None)
        if callable(reset):
            reset()
