"""An independent, OpenID-certified authorization server (npm ``oidc-provider``) plus a small
FHIR R4 API, for SMART conformance tests of the connector.

Our own sandbox EHR (``devtools.sandbox.ehr``) was written with our own assumptions; this one
is panva's certified ``oidc-provider`` configured strictly (``server.mjs`` says how). One node
process serves, over HTTPS on 127.0.0.1 only, with the sandbox CA's server certificate:

* the authorization server, issuer ``https://127.0.0.1:{port}/oauth2``;
* the FHIR API, ``https://127.0.0.1:{port}/fhir/r4`` (a different URL from the issuer, as at
  Epic), with ``.well-known/smart-configuration``, ``metadata``, token-checked reads of
  Patient/Practitioner/Appointment/Encounter (the sandbox seed's resources) and
  ``POST AuditEvent`` for SMART Backend Services tokens;
* test control under ``/_control/...`` (a per-process secret header).

Usage::

    with ConformanceServer(connector_url=stack.url, ca=stack.sandbox.tls) as server:
        url = server.launch_url(config.id, appointment_id="appt-6b1e0d34", user="clinician")
        ...
        server.audit_events()
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, urlencode, urljoin

import httpx

from devtools.sandbox import seed
from devtools.sandbox.tls import SandboxTls, ensure_tls

__all__ = ["CONFORMANCE_DIR", "ConformanceServer", "ensure_installed"]

CONFORMANCE_DIR = Path(__file__).resolve().parent
REPO_ROOT = CONFORMANCE_DIR.parent.parent
SERVER_SCRIPT = CONFORMANCE_DIR / "server.mjs"

UserKind = Literal["clinician", "patient"]


def ensure_installed() -> Path:
    """The ``node`` executable, after ``npm ci`` if ``node_modules`` lacks oidc-provider."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is required for the conformance server (see README)")
    if not (REPO_ROOT / "node_modules" / "oidc-provider" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is required to install oidc-provider (see README)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO_ROOT, check=True)
    return Path(node)


def fixtures() -> dict[str, Any]:
    """The sandbox seed as the conformance server's data: FHIR resources and sign-in users."""
    resources: list[dict[str, Any]] = []
    users: list[dict[str, str]] = []
    for practitioner in seed.PRACTITIONERS.values():
        resources.append(seed.practitioner_resource(practitioner))
        users.append({"id": f"Practitioner/{practitioner.id}", "label": practitioner.name})
    for patient in seed.PATIENTS.values():
        resources.append(seed.patient_resource(patient))
        users.append({"id": f"Patient/{patient.id}", "label": patient.name})
    for appointment in seed.APPOINTMENTS.values():
        resources.append(seed.appointment_resource(appointment))
    for encounter_id in seed.ENCOUNTERS:
        resources.append(seed.encounter_resource(encounter_id))
    return {"resources": resources, "users": users}


class ConformanceServer:
    """``server.mjs`` in a node child process. A context manager; always stops the process."""

    def __init__(
        self,
        *,
        connector_url: str,
        ca: SandboxTls | Path,
        client_id: str = "vv-connector-local",
        port: int = 0,
        startup_timeout: float = 30.0,
    ) -> None:
        self.connector_url = connector_url.rstrip("/")
        self.tls = ca if isinstance(ca, SandboxTls) else ensure_tls(Path(ca))
        self.client_id = client_id
        # Registered with a redirect URI that is not the connector's (see server.mjs).
        self.other_redirect_client_id = f"{client_id}-other-redirect"
        self._port = port
        self._startup_timeout = startup_timeout
        self._control_token = secrets.token_urlsafe(32)
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._stderr: Any = None
        self._client: httpx.Client | None = None
        self.port = 0
        self.origin = ""
        self.issuer = ""
        self.fhir_base = ""

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> ConformanceServer:
        node = ensure_installed()
        self._workdir = tempfile.TemporaryDirectory(prefix="vv-conformance-")
        work = Path(self._workdir.name)
        data = work / "fixtures.json"
        data.write_text(json.dumps(fixtures()))
        self._stderr = (work / "server.log").open("w+b")
        args = [
            str(node),
            str(SERVER_SCRIPT),
            "--port",
            str(self._port),
            "--cert",
            str(self.tls.server_cert),
            "--key",
            str(self.tls.server_key),
            "--connector",
            self.connector_url,
            "--data",
            str(data),
            "--client-id",
            self.client_id,
        ]
        env = {
            **os.environ,
            "CONFORMANCE_CONTROL_TOKEN": self._control_token,
            "NODE_NO_WARNINGS": "1",
        }
        self._proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,  # the server exits when this closes (pytest killed, too)
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
            env=env,
        )
        try:
            ready = self._read_ready()
            self.port = int(ready["port"])
            self.origin = f"https://127.0.0.1:{self.port}"
            self.issuer = str(ready["issuer"])
            self.fhir_base = str(ready["fhirBase"])
            self._client = httpx.Client(
                base_url=self.origin,
                verify=ssl.create_default_context(cafile=str(self.tls.ca_bundle)),
                headers={"X-Control-Token": self._control_token},
                timeout=10.0,
                trust_env=False,
            )
            health = self._client.get("/health")
            health.raise_for_status()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_ready(self) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"conformance server did not start: {self.server_log()}")
                if not selector.select(timeout=min(remaining, 0.5)):
                    if self._proc.poll() is not None:
                        raise RuntimeError(
                            f"conformance server exited ({self._proc.returncode}): "
                            f"{self.server_log()}"
                        )
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    self._proc.wait(5)
                    raise RuntimeError(
                        f"conformance server exited ({self._proc.returncode}): {self.server_log()}"
                    )
                buffer += chunk
        ready: dict[str, Any] = json.loads(buffer.split(b"\n", 1)[0])
        if not ready.get("ready"):
            raise RuntimeError(f"conformance server did not report ready: {ready}")
        return ready

    def server_log(self, limit: int = 4000) -> str:
        """The tail of the node process's stderr (for failure messages)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        text: str = self._stderr.read().decode("utf-8", "replace")
        return text[-limit:]

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> ConformanceServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- control ---------------------------------------------------------------------------
    def _control(self, method: str, path: str, body: Any = None) -> Any:
        if self._client is None:
            raise RuntimeError("the conformance server is not running")
        response = self._client.request(method, path, json=body)
        if response.status_code >= 300:
            raise RuntimeError(
                f"conformance control {method} {path}: {response.status_code} {response.text}"
            )
        return response.json()

    def reset(self) -> None:
        """Discovery back to normal, nonce kept, recorded requests and AuditEvents cleared."""
        self._control("POST", "/_control/reset", {})

    def set_discovery(self, **overrides: Any) -> dict[str, Any]:
        """Override smart-configuration fields (bad modes); no arguments restores it."""
        result: dict[str, Any] = self._control("POST", "/_control/discovery", overrides)
        return result

    def omit_nonce(self, omit: bool = True) -> None:
        """Strip ``nonce`` from authorization requests before oidc-provider sees them, so its
        (genuinely signed) id_tokens carry none."""
        self._control("POST", "/_control/omit-nonce", {"omit": omit})

    def audit_events(self) -> list[dict[str, Any]]:
        """AuditEvents written to the FHIR API: ``{id, resource, clientId, scope, receivedAt}``."""
        events: list[dict[str, Any]] = self._control("GET", "/_control/audit-events")
        return events

    def token_requests(self) -> list[dict[str, Any]]:
        """Token endpoint calls: ``{grantType, clientId, authMethod, status, error, ...}``."""
        requests: list[dict[str, Any]] = self._control("GET", "/_control/token-requests")
        return requests

    def authorize_requests(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self._control("GET", "/_control/authorize-requests")
        return requests

    def fhir_requests(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self._control("GET", "/_control/fhir-requests")
        return requests

    # --- launches --------------------------------------------------------------------------
    def make_launch(
        self,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None = None,
        conference_id: str | None = None,
        deny: bool = False,
    ) -> str:
        """A ``launch`` value for this visit and user (what the EHR puts in the launch URL)."""
        appointment = seed.APPOINTMENTS[appointment_id]
        if user == "clinician":
            who = f"Practitioner/{practitioner_id or appointment.practitioner_id}"
        else:
            who = f"Patient/{appointment.patient_id}"
        body = {
            "user": who,
            "patient": appointment.patient_id,
            "encounter": appointment.encounter_id,
            "appointment": appointment.id,
            "conference": conference_id or appointment.conference_id,
            "deny": deny,
        }
        created: dict[str, str] = self._control("POST", "/_control/launches", body)
        return created["launch"]

    def launch_url(
        self,
        config_id: str,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None = None,
        conference_id: str | None = None,
        deny: bool = False,
        iss: str | None = None,
    ) -> str:
        """The connector's launch URL this EHR opens for that visit and user (``iss`` = the
        FHIR base, never the issuer)."""
        launch = self.make_launch(
            appointment_id=appointment_id,
            user=user,
            practitioner_id=practitioner_id,
            conference_id=conference_id,
            deny=deny,
        )
        kind = "provider" if user == "clinician" else "patient"
        query = urlencode({"iss": iss or self.fhir_base, "launch": launch})
        return f"{self.connector_url}/api/launch/{kind}/{quote(config_id, safe='')}?{query}"

    # --- the sign-in page (standalone launches) ----------------------------------------------
    @staticmethod
    def is_login_page(response: httpx.Response) -> bool:
        return "/oauth2/interaction/" in str(response.url) and 'class="login"' in response.text

    def submit_login(self, browser: Any, page: httpx.Response, user: str) -> httpx.Response:
        """Sign in as ``user`` ("Practitioner/<id>" or "Patient/<id>") on the login page, as a
        person would: POST the page's form with the browser that got it."""
        import html
        import re

        match = re.search(r'<form class="login" method="post" action="([^"]+)"', page.text)
        if not match:
            raise AssertionError(f"no login form on {page.url}")
        action = urljoin(str(page.url), html.unescape(match.group(1)))
        response: httpx.Response = browser.post(action, data={"user": user})
        return response
