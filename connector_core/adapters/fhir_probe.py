"""Checks a FHIR base URL an admin submits, before the connector ever relies on it.

The checks run in this order and stop at the first failure, each with its own actionable message
(``InvalidInputError`` with ``field="fhirBaseUrl"`` and a stable ``code``):

1. ``url-syntax`` / ``url-scheme``: an absolute ``https://`` URL (``http://`` only in dev mode),
   no credentials, query or fragment, no ``.``/``..`` segments.
2. ``url-unresolvable`` / ``url-target``: the host is resolved once with ``getaddrinfo`` and
   *every* address is checked; loopback, private, link-local, shared, reserved, multicast and
   unspecified addresses (also when embedded in IPv4-mapped, 6to4, Teredo or NAT64 IPv6
   addresses) are refused unless ``CONNECTOR_DEV_MODE=1``. Numeric spellings such as
   ``2130706433``, ``0x7f.1`` or ``127.1`` resolve to loopback and are refused like ``127.0.0.1``.
   The probe then connects only to the address it checked (a pinned httpcore network backend;
   the ``Host`` header and TLS SNI/certificate checks still use the URL's host name), so a DNS
   answer that changes between the check and the connection (rebinding) cannot redirect it.
3. ``smart-discovery-unreachable`` / ``smart-discovery-invalid``:
   ``{base}/.well-known/smart-configuration`` answers with a SMART configuration; its
   ``token_endpoint`` and ``jwks_uri`` (called server-side later) pass the same target check.
4. ``pkce-s256-unsupported``: ``code_challenge_methods_supported`` includes ``S256``.
5. ``fhir-metadata-unreachable`` / ``fhir-version-dstu2`` / ``fhir-version-not-r4``:
   ``{base}/metadata`` is a CapabilityStatement with ``fhirVersion`` 4.0.x. A DSTU2 server gets
   a message pointing at the R4 endpoint (the most common setup error) and a ``suggestedUrl``.

Every call is time-limited (connect, read and an overall deadline), bodies are capped, and
redirects are followed at most twice and only to the same host (never https -> http).
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from connector_core.errors import InvalidInputError

__all__ = [
    "FhirProbe",
    "ProbeReport",
    "canonical_fhir_base_url",
    "check_address",
]

FIELD = "fhirBaseUrl"
MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 2
USER_AGENT = "ehr-virtual-visit-connector/url-check"

Resolver = Callable[..., list[tuple[Any, ...]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_DNS_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fhir-probe-dns")


def _problem(code: str, message: str, **extra: Any) -> InvalidInputError:
    return InvalidInputError(
        message,
        field=FIELD,
        code=code,
        errors=[{"field": FIELD, "code": code, "message": message}],
        **extra,
    )


# --- 1. syntax and scheme -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedUrl:
    url: str  # canonical form
    scheme: str
    host: str  # ASCII (IDNA) host as httpx sends it; IPv6 without brackets
    port: int


def _parse(raw: str, *, allow_http: bool) -> _ParsedUrl:
    text = raw.strip()
    if not text:
        raise _problem(
            "url-syntax", "Enter the EHR's FHIR base URL, e.g. https://ehr.example.org/api/FHIR/R4."
        )
    if len(text) > MAX_URL_LENGTH:
        raise _problem(
            "url-syntax", f"The FHIR base URL is longer than {MAX_URL_LENGTH} characters."
        )
    if any(ch.isspace() or ord(ch) < 0x20 or ch in '\\<>"{}|^`' for ch in text):
        raise _problem(
            "url-syntax", "The FHIR base URL contains spaces or characters URLs cannot contain."
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _problem(
            "url-syntax", "The FHIR base URL is not a valid URL (check the host and port)."
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise _problem(
            "url-scheme",
            "The FHIR base URL must be an absolute URL starting with https://, "
            "e.g. https://ehr.example.org/api/FHIR/R4.",
        )
    if scheme == "http" and not allow_http:
        raise _problem(
            "url-scheme",
            "The FHIR base URL must use https:// (http:// is accepted only in dev mode). "
            "Use the EHR's https endpoint.",
        )
    if "@" in parts.netloc:
        raise _problem("url-syntax", "The FHIR base URL must not contain a user name or password.")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise _problem(
            "url-syntax",
            "The FHIR base URL must not have a query (?...) or fragment (#...); enter the base "
            "URL only, e.g. https://ehr.example.org/api/FHIR/R4.",
        )
    segments = parts.path.split("/")
    if any(seg in (".", "..") for seg in segments):
        raise _problem("url-syntax", "The FHIR base URL must not contain '.' or '..' segments.")
    if "//" in parts.path:
        raise _problem("url-syntax", "The FHIR base URL must not contain empty path segments (//).")
    if port == 0:
        raise _problem("url-syntax", "The FHIR base URL has an invalid port (0).")
    try:
        url = httpx.URL(text)
        host = url.raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise _problem(
            "url-syntax", "The FHIR base URL's host name is not valid; check the spelling."
        ) from None
    host = host.rstrip(".")
    if not host:
        raise _problem("url-syntax", "The FHIR base URL has no host name.")
    default_port = 443 if scheme == "https" else 80
    real_port = port if port is not None else default_port
    host_in_url = f"[{host}]" if ":" in host else host
    netloc = host_in_url if real_port == default_port else f"{host_in_url}:{real_port}"
    path = parts.path.rstrip("/")
    return _ParsedUrl(url=f"{scheme}://{netloc}{path}", scheme=scheme, host=host, port=real_port)


def canonical_fhir_base_url(raw: str) -> str:
    """Canonical form of a FHIR base URL: lower-case scheme and host, no default port, no
    trailing slash. Compare launch ``iss`` values against configs in this form."""
    return _parse(raw, allow_http=True).url


# --- 2. target address ----------------------------------------------------------------------------


def _embedded_v4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    if addr in _NAT64:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


def check_address(address: str, *, dev_mode: bool) -> str | None:
    """Why the connector must not call ``address`` (``None`` when it may)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    # Embedded IPv4 first, so the message names what the address really reaches.
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += _embedded_v4(ip)
    candidates.append(ip)
    for each in candidates:
        if each.is_unspecified:
            return "an unspecified address"
        if each.is_multicast:
            return "a multicast address"
        if dev_mode:
            continue
        if each.is_loopback:
            return "a loopback address"
        if each.is_link_local:
            return "a link-local address"
        if isinstance(each, ipaddress.IPv4Address) and each in _SHARED:
            return "a shared (carrier-grade NAT) address"
        if each.is_reserved:
            return "a reserved address"
        if each.is_private:
            return "a private address"
        if not each.is_global:
            return "an address that is not publicly routable"
    return None


# --- pinned connections ---------------------------------------------------------------------------


class _PinnedBackend(httpcore.SyncBackend):
    """Dials only the addresses that were checked, whatever DNS says now."""

    def __init__(self, pins: Mapping[str, str]) -> None:
        self._pins = dict(pins)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        address = self._pins.get(host.lower().rstrip("."))
        if address is None:
            raise httpcore.ConnectError(f"refusing to connect to an unchecked host ({host})")
        return super().connect_tcp(
            address,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )


class _PinnedTransport(httpx.HTTPTransport):
    def __init__(self, *, pins: Mapping[str, str], ssl_context: ssl.SSLContext) -> None:
        # Not calling super().__init__: it would build a pool with the default network backend.
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=4,
            max_keepalive_connections=2,
            keepalive_expiry=5.0,
            retries=0,
            network_backend=_PinnedBackend(pins),
        )


# --- the probe ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeReport:
    fhir_base_url: str  # canonical form
    fhir_version: str
    authorization_endpoint: str
    token_endpoint: str
    address: str  # the checked address the probe connected to
    jwks_uri: str | None = None


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return self._end - time.monotonic()


class FhirProbe:
    """Validates FHIR base URLs (see the module docstring). One instance per process."""

    def __init__(
        self,
        *,
        dev_mode: bool,
        resolver: Resolver = socket.getaddrinfo,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        total_timeout: float = 12.0,
        resolve_timeout: float = 3.0,
        max_body_bytes: int = 1_000_000,
        verify: ssl.SSLContext | bool = True,
        private_targets: Iterable[Any] = (),
    ) -> None:
        self.dev_mode = dev_mode
        self._private_targets = tuple(private_targets)  # ehr_http.PrivateTarget entries
        self._resolver = resolver
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._resolve_timeout = resolve_timeout
        self._max_body = max_body_bytes
        self._verify = verify
        self._ssl_context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    # public ------------------------------------------------------------------------------------

    def check_syntax(self, raw: str) -> str:
        """Step 1 only: the canonical URL, or ``InvalidInputError``."""
        return _parse(raw, allow_http=self.dev_mode).url

    def probe(self, raw: str) -> ProbeReport:
        """All steps; ``InvalidInputError`` naming the first failed check."""
        parsed = _parse(raw, allow_http=self.dev_mode)
        address = self._checked_address(parsed.host, parsed.port, what="FHIR base URL")
        deadline = _Deadline(self._total_timeout)
        with self._client({parsed.host: address}) as client:
            smart = self._discovery(client, parsed, deadline)
            self._check_pkce(smart)
            authorize = self._endpoint(smart, "authorization_endpoint")
            token = self._endpoint(smart, "token_endpoint")
            self._check_server_side_target(token, "token_endpoint")
            jwks_uri = smart.get("jwks_uri")
            if isinstance(jwks_uri, str) and jwks_uri:
                self._check_server_side_target(jwks_uri, "jwks_uri")
            version = self._fhir_version(client, parsed, deadline)
        return ProbeReport(
            fhir_base_url=parsed.url,
            fhir_version=version,
            authorization_endpoint=authorize,
            token_endpoint=token,
            address=address,
            jwks_uri=jwks_uri if isinstance(jwks_uri, str) and jwks_uri else None,
        )

    # step 2 ------------------------------------------------------------------------------------

    def _resolve(self, host: str, port: int) -> list[str]:
        future = _DNS_POOL.submit(self._resolver, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=self._resolve_timeout)
        except FutureTimeout:
            raise _problem(
                "url-unresolvable",
                f"Looking up the host name {host} took too long; check the URL and try again.",
            ) from None
        except (OSError, UnicodeError):
            raise _problem(
                "url-unresolvable",
                f"The host name {host} could not be found (DNS). Check the spelling of the FHIR "
                "base URL.",
            ) from None
        addresses = [str(info[4][0]) for info in infos if info and len(info) > 4]
        if not addresses:
            raise _problem("url-unresolvable", f"The host name {host} has no address.")
        return list(dict.fromkeys(addresses))

    def _checked_address(self, host: str, port: int, *, what: str) -> str:
        addresses = self._resolve(host, port)
        for address in addresses:
            reason = check_address(address, dev_mode=self.dev_mode)
            if reason is not None and any(
                target.matches(address, port) for target in self._private_targets
            ):
                reason = None  # the operator allowed this private target
            if reason is not None:
                # Name the address only for loopback: telling which internal address a name
                # resolves to would make this check a small map of the internal network.
                shown = f" ({address})" if "loopback" in reason and address != host else ""
                raise _problem(
                    "url-target",
                    f"The {what} points to {reason}{shown}, which the connector does not call. "
                    "Use the EHR's public FHIR endpoint (internal, loopback and link-local "
                    "addresses are accepted only in dev mode).",
                )
        return addresses[0]

    def _check_server_side_target(self, url: str, name: str) -> None:
        try:
            parsed = _parse(url, allow_http=self.dev_mode)
        except InvalidInputError:
            raise _problem(
                "smart-discovery-invalid",
                f"The EHR's SMART configuration has an invalid {name} ({url[:200]}). "
                "Ask the EHR vendor to fix its .well-known/smart-configuration.",
            ) from None
        self._checked_address(parsed.host, parsed.port, what=f"SMART configuration's {name}")

    # HTTP --------------------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context(verify=self._verify)
            return self._ssl_context

    def _client(self, pins: Mapping[str, str]) -> httpx.Client:
        return httpx.Client(
            transport=_PinnedTransport(pins=pins, ssl_context=self._context()),
            trust_env=False,  # no proxies: the connection must go to the checked address
            follow_redirects=False,
            timeout=httpx.Timeout(self._read_timeout, connect=self._connect_timeout),
            headers={"User-Agent": USER_AGENT},
        )

    def _get_json(
        self,
        client: httpx.Client,
        parsed: _ParsedUrl,
        url: str,
        *,
        accept: str,
        deadline: _Deadline,
        code: str,
        what: str,
    ) -> tuple[int, Any]:
        """``(status, json or None)`` after at most ``MAX_REDIRECTS`` same-host redirects."""
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            left = deadline.left()
            if left <= 0:
                raise _problem(code, f"The EHR did not answer {what} in time; try again later.")
            timeout = httpx.Timeout(
                min(self._read_timeout, left), connect=min(self._connect_timeout, left)
            )
            try:
                with client.stream(
                    "GET", current, headers={"Accept": accept}, timeout=timeout
                ) as response:
                    if response.is_redirect:
                        current = self._redirect_target(parsed, current, response, code, what)
                        continue
                    body = self._read_capped(response, deadline, code, what)
                    status = response.status_code
            except httpx.TimeoutException:
                raise _problem(
                    code,
                    f"The EHR did not answer {what} within {self._read_timeout:g} seconds. "
                    "Check that the FHIR base URL is right and the server is up.",
                ) from None
            except httpx.HTTPError as exc:
                raise _problem(code, self._connect_message(exc, parsed, what)) from None
            try:
                return status, json.loads(body) if body else None
            except ValueError:
                return status, None
        raise _problem(
            code,
            f"The EHR redirected {what} more than {MAX_REDIRECTS} times; enter the final URL.",
        )

    def _redirect_target(
        self, parsed: _ParsedUrl, current: str, response: httpx.Response, code: str, what: str
    ) -> str:
        location = response.headers.get("location", "")
        target: str = urljoin(current, str(location))
        try:
            nxt = _parse(target.split("?", 1)[0].split("#", 1)[0], allow_http=self.dev_mode)
        except InvalidInputError:
            raise _problem(code, f"The EHR redirected {what} to an invalid URL.") from None
        if nxt.host != parsed.host:
            raise _problem(
                code,
                f"The EHR redirected {what} to another host ({nxt.host}); the connector follows "
                "redirects only on the same host. Enter the FHIR base URL of that host instead.",
            )
        if parsed.scheme == "https" and nxt.scheme != "https":
            raise _problem(code, f"The EHR redirected {what} from https to http; refused.")
        return target

    def _read_capped(
        self, response: httpx.Response, deadline: _Deadline, code: str, what: str
    ) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self._max_body:
                raise _problem(code, f"The EHR's answer to {what} is too large.")
            if deadline.left() <= 0:
                raise _problem(code, f"The EHR did not answer {what} in time; try again later.")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _connect_message(exc: Exception, parsed: _ParsedUrl, what: str) -> str:
        text = str(exc)
        where = f"{parsed.host}:{parsed.port}"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
            return (
                f"The TLS certificate of {where} could not be verified while requesting {what}. "
                "The EHR's FHIR endpoint needs a certificate from a public certificate authority."
            )
        return (
            f"Could not connect to {where} to request {what}. Check the FHIR base URL and that "
            "the server accepts connections from the internet."
        )

    # steps 3-5 ---------------------------------------------------------------------------------

    def _discovery(
        self, client: httpx.Client, parsed: _ParsedUrl, deadline: _Deadline
    ) -> dict[str, Any]:
        url = f"{parsed.url}/.well-known/smart-configuration"
        what = "SMART discovery (.well-known/smart-configuration)"
        hint = _dstu2_hint(parsed.url)
        try:
            status, doc = self._get_json(
                client,
                parsed,
                url,
                accept="application/json",
                deadline=deadline,
                code="smart-discovery-unreachable",
                what=what,
            )
        except InvalidInputError as exc:
            if hint:
                exc.detail = f"{exc.detail} {hint}"
                exc.extra["errors"][0]["message"] = exc.detail
            raise
        if status != 200:
            raise _problem(
                "smart-discovery-unreachable",
                f"{url} answered HTTP {status}; the FHIR base URL must be a SMART on FHIR server "
                "that publishes .well-known/smart-configuration. Check the URL (it usually ends "
                f"in /R4 or /r4).{' ' + hint if hint else ''}",
            )
        if not isinstance(doc, dict):
            raise _problem(
                "smart-discovery-invalid",
                f"{url} did not return a JSON SMART configuration. Check that the FHIR base URL "
                "is the FHIR endpoint itself.",
            )
        for key in ("authorization_endpoint", "token_endpoint"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise _problem(
                    "smart-discovery-invalid",
                    f"The EHR's SMART configuration has no {key}; the connector needs SMART App "
                    "Launch (authorization code flow) enabled for this FHIR endpoint.",
                )
        return doc

    @staticmethod
    def _check_pkce(smart: Mapping[str, Any]) -> None:
        methods = smart.get("code_challenge_methods_supported")
        if not isinstance(methods, list) or "S256" not in methods:
            shown = ", ".join(str(m) for m in methods) if isinstance(methods, list) else "none"
            raise _problem(
                "pkce-s256-unsupported",
                "The EHR's SMART configuration does not list S256 in "
                f"code_challenge_methods_supported (it lists: {shown[:100]}). The connector "
                "requires PKCE with S256: ask the EHR administrator or vendor to enable it.",
            )

    def _endpoint(self, smart: Mapping[str, Any], key: str) -> str:
        value = str(smart[key])
        try:
            return _parse(value, allow_http=self.dev_mode).url
        except InvalidInputError:
            raise _problem(
                "smart-discovery-invalid",
                f"The EHR's SMART configuration has an invalid {key} ({value[:200]}); it must be "
                "an absolute https URL. Ask the EHR vendor to fix its smart-configuration.",
            ) from None

    def _fhir_version(self, client: httpx.Client, parsed: _ParsedUrl, deadline: _Deadline) -> str:
        url = f"{parsed.url}/metadata"
        status, doc = self._get_json(
            client,
            parsed,
            url,
            accept="application/fhir+json, application/json+fhir;q=0.9, application/json;q=0.8",
            deadline=deadline,
            code="fhir-metadata-unreachable",
            what="FHIR /metadata",
        )
        if status != 200 or not isinstance(doc, dict):
            raise _problem(
                "fhir-metadata-unreachable",
                f"{url} answered HTTP {status} without a FHIR CapabilityStatement. Check that the "
                "FHIR base URL is the server's FHIR R4 endpoint.",
            )
        version = doc.get("fhirVersion")
        resource_type = doc.get("resourceType")
        version_text = str(version) if isinstance(version, str) else ""
        if resource_type == "Conformance" or version_text.startswith(("0.", "1.0", "1.")):
            suggested = _r4_suggestion(parsed.url)
            message = (
                f"This is a FHIR DSTU2 endpoint (fhirVersion {version_text or 'unknown'}). The "
                "connector needs the FHIR R4 endpoint of the same server"
                + (f": try {suggested}" if suggested else " (for Epic, .../api/FHIR/R4)")
                + "."
            )
            raise _problem("fhir-version-dstu2", message, suggestedUrl=suggested)
        if resource_type != "CapabilityStatement" or not version_text:
            raise _problem(
                "fhir-metadata-unreachable",
                f"{url} is not a FHIR CapabilityStatement with a fhirVersion. Check that the URL "
                "is the server's FHIR R4 endpoint.",
            )
        if not re.fullmatch(r"4\.0(\.\d+)?(-.*)?", version_text):
            name = "STU3" if version_text.startswith("3.") else f"version {version_text}"
            raise _problem(
                "fhir-version-not-r4",
                f"This FHIR endpoint is FHIR {name}; the connector needs FHIR R4 (4.0.x). Enter "
                "the server's R4 endpoint.",
            )
        return version_text


def _dstu2_hint(url: str) -> str:
    if re.search(r"dstu2", urlsplit(url).path, re.IGNORECASE):
        suggested = _r4_suggestion(url)
        return "The URL looks like a DSTU2 endpoint; the connector needs the FHIR R4 endpoint" + (
            f" (try {suggested})." if suggested else "."
        )
    return ""


def _r4_suggestion(url: str) -> str | None:
    parts = urlsplit(url)
    if not re.search(r"dstu2", parts.path, re.IGNORECASE):
        return None

    def swap(match: re.Match[str]) -> str:
        return "r4" if match.group(0).islower() else "R4"

    path = re.sub(r"dstu2", swap, parts.path, flags=re.IGNORECASE)
    return f"{parts.scheme}://{parts.netloc}{posixpath.normpath(path) if path else ''}"
