"""The whole local stack for integration and e2e tests: Azurite + sandbox + the connector host.

One ``Stack`` per test session (fixture ``stack`` in tests/conftest.py). The connector runs
in-process on ``devtools.host.LocalHost`` with the real ``function_app.app``; its settings are
environment variables set here, exactly as ``make run`` sets them.
"""

from __future__ import annotations

import http.cookiejar
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from connector_core.bootstrap import Container, get_container, reset_container
from connector_core.domain.models import EhrVendor, Environment, Region, TenantConfig
from devtools._serve import free_port
from devtools.azurite import Azurite
from devtools.dev_secrets import dev_secret_settings
from devtools.sandbox import Sandbox
from devtools.seed_config import add_approved_config

__all__ = ["Browser", "LogCapture", "Stack"]

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


class _BrowserCookiePolicy(http.cookiejar.DefaultCookiePolicy):
    """As browsers do: loopback http is a secure context, so Secure cookies are sent there."""

    def return_ok_secure(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        host = urlsplit(request.get_full_url()).hostname or ""
        if cookie.secure and host in _LOOPBACK_HOSTS:
            return True
        return bool(super().return_ok_secure(cookie, request))


class Browser:
    """A browser-like client: follows redirects, keeps cookies per host, trusts the sandbox CA."""

    def __init__(self, *, ca_bundle: str | None = None, follow_redirects: bool = True) -> None:
        jar = http.cookiejar.CookieJar(policy=_BrowserCookiePolicy())
        verify: ssl.SSLContext | bool = True
        if ca_bundle:
            verify = ssl.create_default_context(cafile=ca_bundle)
        self.client = httpx.Client(
            cookies=jar,
            follow_redirects=follow_redirects,
            max_redirects=20,
            verify=verify,
            timeout=30.0,
            headers={"User-Agent": "Mozilla/5.0 (test browser)", "Accept": "text/html,*/*"},
            event_hooks={"request": [self._add_cookies]},
        )
        self.jar = jar

    def _add_cookies(self, request: httpx.Request) -> None:
        # httpx merges cookies into a jar with the default policy (no Secure cookies over
        # http); rebuild the Cookie header from our jar with the browser-like policy.
        request.headers.pop("cookie", None)
        compat = httpx._models.Cookies._CookieCompatRequest(request)  # type: ignore[attr-defined]
        self.jar.add_cookie_header(compat)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(url, **kwargs)

    def cookie_names(self) -> list[str]:
        return [c.name for c in self.jar]

    def close(self) -> None:
        self.client.close()


class LogCapture(logging.Handler):
    """Every log record of the process, formatted, for privacy scans."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self._guard = threading.Lock()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record must not break the app
            text = str(record.msg)
        with self._guard:
            self.lines.append(text)

    def text(self) -> str:
        with self._guard:
            return "\n".join(self.lines)


class Stack:
    def __init__(self, azurite: Azurite, *, region: Region = Region.AMERICAS) -> None:
        self.azurite = azurite
        self.region = region
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.portal = f"{self.api}/portal"
        self.sandbox = Sandbox(
            connector_url=self.url, portal_redirect_uris=(f"{self.portal}/signin-callback",)
        )
        self.logs = LogCapture()
        self._saved_env: dict[str, str | None] = {}
        self.host: Any = None

    def start(self) -> Stack:
        import function_app
        from devtools.host import LocalHost

        self.sandbox.start()
        env = {
            "CONNECTOR_REGION": self.region.value,
            "CONNECTOR_PUBLIC_URL": self.url,
            "CONNECTOR_STORAGE": self.azurite.connection_string,
            "CONNECTOR_DEV_MODE": "1",
            # The approver's EHR sign-in returns to the portal's page, as in `make run`.
            "CONNECTOR_PORTAL_URL": self.portal,
            "ENTRA_API_AUDIENCE": "",
            **dev_secret_settings(),
            **self.sandbox.connector_settings(),
        }
        for key, value in env.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        root = logging.getLogger()
        root.addHandler(self.logs)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        reset_container()
        self.host = LocalHost(function_app.app, port=self.port).start()
        return self

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()
        self.sandbox.stop()
        logging.getLogger().removeHandler(self.logs)
        reset_container()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def container(self) -> Container:
        return get_container()

    def browser(self, *, follow_redirects: bool = True) -> Browser:
        return Browser(ca_bundle=str(self.sandbox.ca_bundle), follow_redirects=follow_redirects)

    def http(self) -> httpx.Client:
        """A plain API client (no cookies kept across calls)."""
        return httpx.Client(base_url=self.api, timeout=30.0)

    # -- data helpers -------------------------------------------------------------------
    def tenant(self, index: int = 0) -> Any:
        return list(self.sandbox.entra.tenants.values())[index]

    def create_approved_config(
        self,
        *,
        tenant_id: str | None = None,
        vendor: EhrVendor = EhrVendor.SMART,
        environment: Environment = Environment.TEST,
        fhir_base_url: str | None = None,
    ) -> TenantConfig:
        """An approved config for the sandbox EHR, written through the repository (a fixture
        for launch and presence tests; the portal API's own tests go through HTTP)."""
        return add_approved_config(
            self.container(),
            tenant_id=tenant_id or self.tenant(0).tid,
            fhir_base_url=fhir_base_url or self.sandbox.fhir_base,
            vendor=vendor,
            environment=environment,
            created_by="fixture",
        )

    def table_dump(self) -> list[dict[str, Any]]:
        """Every entity of every table in this stack's Azurite (for privacy scans)."""
        from azure.data.tables import TableServiceClient

        service = TableServiceClient.from_connection_string(self.azurite.connection_string)
        rows: list[dict[str, Any]] = []
        for table in service.list_tables():
            client = service.get_table_client(table.name)
            rows.extend({"_table": table.name, **dict(e)} for e in client.list_entities())
        return rows


@contextmanager
def running_stack(azurite: Azurite) -> Iterator[Stack]:
    stack = Stack(azurite)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def delete_configs_of(stack: Stack, base_url: str) -> None:
    """Delete every tenant's configs whose FHIR base URL is on ``base_url`` (a test's own EHR)."""
    container = stack.container()
    for tenant in stack.sandbox.entra.tenants:
        for versioned in container.configs.list(tenant):
            if versioned.record.fhir_base_url.startswith(base_url):
                container.configs.delete(tenant, versioned.record.id)


@contextmanager
def own_ehr(stack: Stack, name: str) -> Iterator[Any]:
    """A sandbox EHR server of a test module's own (its FHIR base URLs are unique to it); its
    configs are deleted when it stops."""
    from devtools._serve import ServerThread
    from devtools.sandbox.ehr import SandboxEhr

    instance = SandboxEhr(
        connector_url=stack.url,
        smart_client_id=stack.sandbox.smart_client_id,
        connector_jwks_url=f"{stack.api}/.well-known/jwks.json",
    )
    with ServerThread(instance.app, name=name) as server:
        instance.set_base_url(server.url)
        yield instance
        delete_configs_of(stack, server.url)
