"""Telemetry without secrets (issue 14, item 4): launches and sign-ins under the local host, with
logging at the level host.json sets for Azure, leave no OAuth query value (code, state, launch,
iss), no token and no sealed state in any log record; and host.json keeps errors and warnings
out of sampling and request telemetry free of query strings."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urljoin, urlsplit

import httpx
import pytest

from connector_core.domain.models import TenantConfig
from devtools._serve import ServerThread
from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr, find_signin_link
from tests.e2e.launch.helpers import drop_config, forget_mapping, own_config
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
APPOINTMENT = "appt-6b1e0d34"
ADMIN = "admin@contosohealth.onmicrosoft.com"
APPROVER = "ehr.analyst@contosohealth.onmicrosoft.com"
# Query parameters whose values must never be logged (docs/design.md: launch and sign-in callbacks).
SECRET_PARAMETERS = {"code", "state", "launch", "iss", "session_state"}
_ACCOUNT_LINK = re.compile(r'<a class="account[^"]*" data-upn="([^"]+)"[^>]*href="([^"]+)"')
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")

# host.json level names -> Python logging levels (what the Functions host lets through).
_LEVELS = {
    "Trace": logging.DEBUG,
    "Debug": logging.DEBUG,
    "Information": logging.INFO,
    "Warning": logging.WARNING,
    "Error": logging.ERROR,
    "Critical": logging.CRITICAL,
}


def _host_json() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((REPO_ROOT / "host.json").read_text(encoding="utf-8"))
    return loaded


def azure_function_log_level() -> int:
    """The level host.json lets through for function (user) logs in Azure."""
    levels = _host_json()["logging"]["logLevel"]
    return _LEVELS[levels.get("Function", levels.get("default", "Information"))]


class RecordCapture(logging.Handler):
    """Keeps every record (not just formatted text): message, args, exception, extras."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.records.append(record)

    def texts(self) -> list[str]:
        """Everything a handler could send on, per record."""
        formatter = logging.Formatter()
        out = []
        with self._guard:
            records = list(self.records)
        for record in records:
            parts = [record.getMessage(), str(record.msg), repr(record.args)]
            if record.exc_info:
                parts.append(formatter.formatException(record.exc_info))
            if record.exc_text:
                parts.append(record.exc_text)
            if record.stack_info:
                parts.append(record.stack_info)
            parts.extend(f"{k}={v!r}" for k, v in vars(record).items() if k not in ("msg", "args"))
            out.append("\n".join(parts))
        return out


@pytest.fixture
def azure_logging(stack: Stack) -> Iterator[RecordCapture]:
    """Root logging at host.json's level for functions, with a record-keeping handler."""
    capture = RecordCapture()
    root = logging.getLogger()
    saved = root.level
    root.setLevel(azure_function_log_level())
    root.addHandler(capture)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(saved)


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


class Walk:
    """A browser that follows redirects one hop at a time and remembers every URL."""

    def __init__(self, stack: Stack) -> None:
        self.browser = Browser(ca_bundle=str(stack.sandbox.ca_bundle), follow_redirects=False)
        self.urls: list[str] = []

    def go(self, url: str, *, hops: int = 20) -> httpx.Response:
        for _ in range(hops):
            self.urls.append(url)
            response = self.browser.get(url)
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            url = urljoin(url, response.headers["location"])
        raise AssertionError(f"too many redirects from {self.urls[0]}")

    def pick_account(self, page: httpx.Response, upn: str) -> httpx.Response:
        import html

        for found_upn, href in _ACCOUNT_LINK.findall(page.text):
            if html.unescape(found_upn) == upn:
                return self.go(urljoin(str(page.url), html.unescape(href)))
        raise AssertionError(f"no account {upn} on {page.url}")

    def secret_values(self) -> set[str]:
        values = set()
        for url in self.urls:
            for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=False):
                if name in SECRET_PARAMETERS and len(value) >= 6:
                    values.add(value)
        for cookie in self.browser.jar:
            if cookie.value and len(cookie.value) >= 16:
                values.add(cookie.value)  # sealed launch / visit state
        return values

    def close(self) -> None:
        self.browser.close()


def _variants(value: str) -> set[str]:
    return {value, quote(value, safe=""), quote_plus(value), quote(value, safe="/:")}


def test_host_json_keeps_errors_and_query_strings_where_they_belong() -> None:
    insights = _host_json()["logging"]["applicationInsights"]
    excluded = set(insights["samplingSettings"]["excludedTypes"].split(";"))
    # Sampling never drops a request, an exception or a trace (warnings and errors are traces).
    assert {"Request", "Exception", "Trace"} <= excluded
    # Request telemetry is made by the Functions host per invocation (function name, status,
    # duration), not by ASP.NET Core request tracking, which records the full URL with its
    # query string (code, state, launch, iss).
    assert insights["httpAutoCollectionOptions"]["enableHttpTriggerExtendedInfoCollection"] is False
    assert azure_function_log_level() <= logging.INFO  # the scan below runs at least this chatty


def test_launch_and_sign_in_logs_carry_no_query_values_tokens_or_state(
    fresh_stack: Stack, config: TenantConfig, azure_logging: RecordCapture
) -> None:
    s = fresh_stack
    practitioner = seed.APPOINTMENTS[APPOINTMENT].practitioner_id
    forget_mapping(s, practitioner)
    walks: list[Walk] = []

    # Clinician, first time: SMART EHR launch, then Entra sign-in (sso-callback), then Teams.
    clinician = Walk(s)
    walks.append(clinician)
    page = clinician.go(
        s.sandbox.ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
    )
    assert "/oauth2/v2.0/authorize" in str(page.url), page.text[:300]
    landed = clinician.pick_account(page, s.sandbox.entra.user_for_practitioner(practitioner).upn)
    assert 'class="join-page"' in landed.text, landed.text[:300]
    # The same clinician again (no sign-in), and the patient from MyChart.
    again = Walk(s)
    walks.append(again)
    assert (
        'class="join-page"'
        in again.go(
            s.sandbox.ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="clinician")
        ).text
    )
    patient = Walk(s)
    walks.append(patient)
    assert (
        'class="join-page"'
        in patient.go(
            s.sandbox.ehr.launch_url(config.id, appointment_id=APPOINTMENT, user="patient")
        ).text
    )
    # A launch whose callback fails (replayed state): error paths log too.
    replay = Walk(s)
    walks.append(replay)
    callback = next(u for u in again.urls if "/api/launch/callback?" in u)
    assert replay.go(callback).status_code >= 400

    # The approver's EHR sign-in (portal API, then the browser to /ehr-signin/callback).
    approver_tokens = _approver_ehr_signin(s, walks)

    secrets = set().union(*(w.secret_values() for w in walks))
    secrets |= set(approver_tokens)
    secrets |= {t for t in _ehr_access_tokens(s) if len(t) >= 16}
    assert len(secrets) >= 10, secrets  # codes, states, launches, issuers, cookies, tokens
    # A library that logs a callback URL (with code, state, iss) is scrubbed on the way in
    # (connector_core.logs.install_redaction), and the scan would see the URL unscrubbed.
    logging.getLogger("some.http.library").warning("GET %s failed", callback)
    assert _leaks(secrets, [callback])
    texts = azure_logging.texts()
    assert any("launch.completed" in t for t in texts)  # the scan sees the connector's records
    assert any("/api/launch/callback" in t for t in texts)  # and the host's request lines
    assert any("some.http.library" in t and "[redacted]" in t for t in texts)
    assert _leaks(secrets, texts) == []
    jwts = [t[:160] for t in texts if _JWT.search(t)]
    assert jwts == []
    bearer = [t[:160] for t in texts if re.search(r"(?i)bearer\s+[A-Za-z0-9]", t)]
    assert bearer == []
    for walk in walks:
        walk.close()


def _approver_ehr_signin(s: Stack, walks: list[Walk]) -> list[str]:
    """Create a config through the portal API on a module-own EHR, then the approver's EHR
    sign-in in a browser. Returns the portal bearer tokens used."""
    ehr = SandboxEhr(
        connector_url=s.url,
        smart_client_id=s.sandbox.smart_client_id,
        connector_jwks_url=f"{s.api}/.well-known/jwks.json",
    )
    tokens = [s.sandbox.entra.mint_user_token(ADMIN), s.sandbox.entra.mint_user_token(APPROVER)]
    with (
        ServerThread(ehr.app, name="telemetry-test-ehr") as server,
        httpx.Client(base_url=s.api, timeout=30.0) as api,
    ):
        ehr.set_base_url(server.url)
        created = api.post(
            "/configs",
            json={"fhirBaseUrl": ehr.fhir_base, "approverUpn": APPROVER, "environment": "test"},
            headers={"Authorization": f"Bearer {tokens[0]}"},
        )
        assert created.status_code == 201, created.text
        config_id = created.json()["id"]
        try:
            started = api.post(
                f"/configs/{config_id}/ehr-signin",
                headers={"Authorization": f"Bearer {tokens[1]}"},
            )
            assert started.status_code == 200, started.text
            walk = Walk(s)
            walks.append(walk)
            page = walk.go(started.json()["authorizeUrl"])
            done = walk.go(urljoin(str(page.url), find_signin_link(page.text)))
            assert done.status_code == 200 and "EHR sign-in complete" in done.text, done.text[:300]
            assert any("/api/ehr-signin/callback?" in u for u in walk.urls)
        finally:
            container = s.container()
            tenant = created.json()["tenantId"]
            container.configs.delete(tenant, config_id)
        tokens.extend(t for t in _ehr_access_tokens_of(ehr) if len(t) >= 16)
    return tokens


def _leaks(secrets: set[str], texts: list[str]) -> list[str]:
    return sorted(
        {
            f"{value[:12]}... in: {text[:160]!r}"
            for value in secrets
            for variant in _variants(value)
            for text in texts
            if variant in text
        }
    )


def _ehr_access_tokens_of(ehr: Any) -> list[str]:
    tokens = getattr(ehr, "_tokens", None)
    if tokens is None:
        tokens = getattr(getattr(ehr, "_ehr", None), "_tokens", {})
    return list(tokens)


def _ehr_access_tokens(s: Stack) -> list[str]:
    """Access tokens the sandbox EHR issued to the connector (opaque strings)."""
    return _ehr_access_tokens_of(s.sandbox.ehr)
