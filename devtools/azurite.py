"""Start and stop Azurite (npm ``azurite``) on free loopback ports, in memory.

Used by the tests (one instance per session) and by ``make run``. Bootstraps
``node_modules`` with ``npm ci`` when Azurite is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from devtools._serve import free_port

__all__ = ["ACCOUNT_KEY", "ACCOUNT_NAME", "Azurite", "ensure_installed"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# Azurite's well-known development account (public, documented by Microsoft).
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def ensure_installed() -> Path:
    """Path of the azurite executable, running ``npm ci`` first if node_modules lacks it."""
    exe = REPO_ROOT / "node_modules" / ".bin" / "azurite"
    if not exe.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is required to install Azurite (see README: prerequisites)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO_ROOT, check=True)
    return exe


def _wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"Azurite did not open port {port}")


class Azurite:
    """An Azurite process serving blob, queue and table on loopback.

    ``in_memory=True`` (default) keeps no files. Fixed ports may be passed (``make run`` uses
    the usual 10000-10002); by default free ports are chosen.
    """

    def __init__(
        self,
        *,
        blob_port: int | None = None,
        queue_port: int | None = None,
        table_port: int | None = None,
        in_memory: bool = True,
    ) -> None:
        self.blob_port = blob_port or free_port()
        self.queue_port = queue_port or free_port()
        self.table_port = table_port or free_port()
        self.in_memory = in_memory
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/{ACCOUNT_NAME};"
            f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/{ACCOUNT_NAME};"
            f"TableEndpoint=http://127.0.0.1:{self.table_port}/{ACCOUNT_NAME};"
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, *, timeout: float = 60.0) -> Azurite:
        exe = ensure_installed()
        self._workdir = tempfile.TemporaryDirectory(prefix="azurite-")
        args = [
            str(exe),
            "--silent",
            "--disableTelemetry",  # Azurite phones home by default; tests stay off the network
            "--skipApiVersionCheck",
            "--disableProductStyleUrl",
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.blob_port),
            "--queueHost",
            "127.0.0.1",
            "--queuePort",
            str(self.queue_port),
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            str(self.table_port),
        ]
        # In memory: no files at all; otherwise the data lives in a temporary folder.
        args += ["--inMemoryPersistence"] if self.in_memory else ["--location", self._workdir.name]
        self._proc = subprocess.Popen(
            args,
            cwd=self._workdir.name,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        deadline = time.monotonic() + timeout
        try:
            for port in (self.blob_port, self.queue_port, self.table_port):
                _wait_for_port(port, deadline)
        except TimeoutError:
            err = b""
            if self._proc.poll() is not None and self._proc.stderr is not None:
                err = self._proc.stderr.read()
            self.stop()
            raise RuntimeError(f"Azurite failed to start: {err.decode(errors='replace')}") from None
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def restart(self) -> None:
        """Stop and start again on the same ports (in-memory data is lost)."""
        self.stop()
        self.start()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
