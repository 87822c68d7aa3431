"""The one guarded HTTP client for every call to an EHR (docs/design.md section 5, "Launch").

Discovery, JWKS, token requests, FHIR reads, AuditEvent and Epic's connection-status call all go
through ``guarded_client``. An EHR's discovery document and DNS are controlled by whoever runs that
EHR (a tenant), so nothing they say is trusted to be a safe target:

* **scheme**: ``https`` only, unless ``CONNECTOR_DEV_MODE=1`` (``EhrTargetPolicy.check_url``);
* **address**: the host is resolved on *every new connection* and every address is checked with
  ``fhir_probe.check_address`` (loopback, private, link-local, shared, reserved ... refused outside
  dev mode); the connection then goes to a checked address only, so a DNS answer that changes
  between check and connect (rebinding) cannot redirect it. ``CONNECTOR_EHR_PRIVATE_TARGETS``
  lets an operator allow exact private targets (an EHR reachable only over a private network);
* **no proxies** (``trust_env=False``: a proxy would connect on our behalf to unchecked
  addresses) and **no redirects** (``follow_redirects=False``; callers treat 3xx as an error);
* refusals are ``PermissionDeniedError`` (403: the connector will not make that call), not an
  ``EhrError`` (502: the EHR failed);
* **endpoints**: ``EhrTargetPolicy.check_endpoint`` re-validates every endpoint taken from a
  discovery document on every use: its scheme, and its host must be the FHIR base's host, share its
  registrable domain (Public Suffix List), or be in the allowance recorded on the configuration
  when it was checked and approved.

Outbound TLS trusts ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` / ``REQUESTS_CA_BUNDLE`` like the rest of
the connector (docs/design.md section 4), so a local HTTPS sandbox works without code changes.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from connector_core.adapters.fhir_probe import check_address
from connector_core.errors import PermissionDeniedError, SettingsError

__all__ = [
    "EhrTargetPolicy",
    "PrivateTarget",
    "describe_hosts",
    "guarded_client",
    "is_target_refusal",
    "parse_private_targets",
    "registrable_domain",
]

Resolver = Callable[..., list[tuple[Any, ...]]]
_DNS_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ehr-dns")
_RESOLVE_TIMEOUT = 3.0
_SETTING = "CONNECTOR_EHR_PRIVATE_TARGETS"


@dataclass(frozen=True)
class PrivateTarget:
    """An operator's allowance for a non-public EHR address: a network and optionally a port."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None

    def matches(self, address: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return ip in self.network and (self.port is None or self.port == port)


def parse_private_targets(text: str | None) -> tuple[PrivateTarget, ...]:
    """``CONNECTOR_EHR_PRIVATE_TARGETS``: comma-separated ``ADDRESS[/PREFIX][:PORT]`` entries,
    IPv6 in brackets (``[fd00::5]:443``). ``SettingsError`` names a bad entry."""
    targets: list[PrivateTarget] = []
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        port: int | None = None
        host = entry
        if entry.startswith("["):
            host, closed, rest = entry[1:].partition("]")
            if not closed:  # "[fd00::1:443" must not become the address fd00::1:443, any port
                raise SettingsError(_SETTING, f"no closing bracket in {entry!r}")
            if rest.startswith(":"):
                port = _port(rest[1:], entry)
            elif rest:
                raise SettingsError(_SETTING, f"cannot read {entry!r}")
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
            port = _port(port_text, entry)
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise SettingsError(
                _SETTING,
                f"{entry!r} is not an address or network (use ADDRESS[/PREFIX][:PORT], IPv6 in "
                "brackets)",
            ) from None
        targets.append(PrivateTarget(network, port))
    return tuple(targets)


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SettingsError(_SETTING, f"bad port in {entry!r}")
    return int(text)


@lru_cache(maxsize=1)
def _suffix_list() -> Any:
    # Loaded only when two hosts differ (rare on the hot path): keeps cold start small.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def registrable_domain(host: str) -> str:
    """The registrable domain ("eTLD+1") of ``host``; an IP address or a name without one
    (``localhost``) is its own."""
    name = host.lower().rstrip(".")
    if _is_ip(name):
        return name
    domain = _suffix_list().privatesuffix(name)
    return str(domain) if domain else name


def _host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower().rstrip(".")


@dataclass(frozen=True)
class EhrTargetPolicy:
    """What the connector may call at an EHR (see the module docstring)."""

    dev_mode: bool
    private_targets: tuple[PrivateTarget, ...] = ()

    def refusal(self, address: str, port: int) -> str | None:
        """Why ``address:port`` must not be called (``None`` when it may)."""
        reason = check_address(address, dev_mode=self.dev_mode)
        if reason is None:
            return None
        if any(target.matches(address, port) for target in self.private_targets):
            return None
        return reason

    def check_url(self, url: str, what: str) -> None:
        parts = urlsplit(url)
        allowed = ("https", "http") if self.dev_mode else ("https",)
        if parts.scheme not in allowed or not parts.hostname:
            raise PermissionDeniedError(
                f"The EHR's {what} is not an https URL, which the connector does not call.",
                reason="ehr_target_refused",
            )
        if parts.username or parts.password or any(c in url for c in "\r\n\t "):
            raise PermissionDeniedError(
                f"The EHR's {what} is not a usable URL.", reason="ehr_target_refused"
            )

    def check_endpoint(
        self, url: str, *, fhir_base_url: str, allowed_hosts: Iterable[str], what: str
    ) -> str:
        """``url`` from a discovery document, checked against the config's FHIR base."""
        self.check_url(url, what)
        host = _host_of(url)
        base_host = _host_of(fhir_base_url)
        if host == base_host or host in {h.lower() for h in allowed_hosts}:
            return url
        if not _is_ip(host) and registrable_domain(host) == registrable_domain(base_host):
            return url
        raise PermissionDeniedError(
            f"The EHR's {what} is on a host this configuration was not approved for.",
            action="Ask the EHR analyst to check the configuration in the portal; an admin can "
            "save it again to record the EHR's current endpoints, then the approver approves.",
            reason="ehr_host_not_approved",
        )


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves and checks the host on every new connection; dials checked addresses only."""

    def __init__(self, policy: EhrTargetPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolver = resolver

    def _addresses(self, host: str, port: int) -> list[str]:
        future = _DNS_POOL.submit(self._resolver, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=_RESOLVE_TIMEOUT)
        except (FutureTimeout, OSError, UnicodeError):
            raise httpcore.ConnectError(f"could not resolve {host}") from None
        found = [str(info[4][0]) for info in infos if info and len(info) > 4]
        return list(dict.fromkeys(found))

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._addresses(host, port)
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        for address in addresses:  # every address: one bad answer taints the name
            reason = self._policy.refusal(address, port)
            if reason is not None:
                raise _TargetRefused(reason)
        last: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as error:  # e.g. ::1 when the server listens on v4
                last = error
        assert last is not None
        raise last


class _TargetRefused(httpcore.ConnectError):
    """The guard refused an address (kept apart from a failed connection for the log)."""


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(
        self,
        *,
        policy: EhrTargetPolicy,
        resolver: Resolver,
        ssl_context: ssl.SSLContext,
        max_connections: int,
    ) -> None:
        # Not calling super().__init__: it would build a pool with the default network backend.
        self._policy = policy
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max(2, max_connections // 4),
            keepalive_expiry=30.0,
            retries=0,
            network_backend=_GuardedBackend(policy, resolver),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https" and not (
            self._policy.dev_mode and request.url.scheme == "http"
        ):
            raise httpx.UnsupportedProtocol(
                "only https is allowed to an EHR outside dev mode", request=request
            )
        return super().handle_request(request)


_CONTEXT_LOCK = threading.Lock()


def _ssl_context() -> ssl.SSLContext:
    with _CONTEXT_LOCK:
        cafile = os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
        if cafile:
            return ssl.create_default_context(cafile=cafile)
        capath = os.environ.get("SSL_CERT_DIR")
        if capath:
            return ssl.create_default_context(capath=capath)
        return httpx.create_ssl_context()


def guarded_client(
    policy: EhrTargetPolicy,
    *,
    resolver: Resolver = socket.getaddrinfo,
    timeout: httpx.Timeout | None = None,
    max_connections: int = 100,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.Client:
    """An httpx client for EHR calls under ``policy`` (one per process; see module docstring)."""
    return httpx.Client(
        transport=_GuardedTransport(
            policy=policy,
            resolver=resolver,
            ssl_context=ssl_context or _ssl_context(),
            max_connections=max_connections,
        ),
        trust_env=False,
        follow_redirects=False,
        timeout=timeout or httpx.Timeout(10.0, connect=3.0),
    )


def is_target_refusal(error: BaseException) -> bool:
    """Whether an httpx error was the guard refusing an address (for logs, never for pages)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, _TargetRefused | httpx.UnsupportedProtocol):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def describe_hosts(urls: Sequence[str | None]) -> tuple[str, ...]:
    """The distinct host names of ``urls`` (for the allowance recorded on a config)."""
    return tuple(dict.fromkeys(_host_of(u) for u in urls if u and _host_of(u)))
