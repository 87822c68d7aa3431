"""Sandbox SMART EHR: a strict, local stand-in for Epic, Oracle Health or any SMART on FHIR EHR.

Implements what the connector relies on (docs/design.md): SMART App Launch 2.x discovery, EHR and
standalone launch with PKCE (S256 only), ``private_key_jwt`` client authentication (RS384/ES384,
``jti`` replay refused), SMART Backend Services (client credentials), FHIR R4 reads, ``POST
AuditEvent`` and Epic's ``SetExternalConnectionStatus``. Fault injection (``fail_next``,
``set_down``) and inspection lists (``audit_events``, ``epic_status_calls``, ``token_requests``)
serve the tests; a page at ``/`` lists today's appointments per profile with "Start virtual visit"
buttons for a demo.

It behaves like real EHRs wherever a client can get them wrong: the OAuth ``issuer`` is never the
FHIR base URL, every authorization response (code and error redirects) carries RFC 9207 ``iss``,
id_tokens carry ``iss`` (the issuer), ``aud``, ``exp``, ``iat``, the request's ``nonce`` and an
absolute ``fhirUser``, and launch context arrives in the token response.

Three profiles, path-prefixed routes of the one server (``base`` = the server's base URL,
``http://127.0.0.1:PORT``; get one with ``ehr.profile(name)``; ``T`` = :data:`ORACLE_TENANT_ID`)::

    default  FHIR base {base}/fhir/r4               issuer {base}/oauth2
             launch context: patient, encounter, fhirContext [Appointment (+ conference id)]
    epic     FHIR base {base}/epic/api/FHIR/R4      issuer {base}/epic/oauth2
             launch context: patient, encounter, fhirContext [Appointment, Encounter]; a
             group visit's launch URL carries sessionId=<conference id>
    oracle   FHIR base {base}/oracle/r4/T           issuer http://localhost:PORT/oracle/tenants/T/oidc/idsp/
             (Oracle Health / Cerner Millennium: the authorization server is on its own host,
             ``localhost`` instead of ``127.0.0.1``); launch context: patient, encounter only

URL layout per profile (``fhir`` = its FHIR base, ``auth`` = its authorization server's origin)::

    GET  {fhir}/.well-known/smart-configuration
    GET  {fhir}/.well-known/openid-configuration           (default and epic, as Epic does)
    GET  {issuer}/.well-known/openid-configuration          (trailing "/" of the issuer dropped)
    GET  {fhir}/metadata                                     CapabilityStatement (4.0.1)
    GET  {fhir}/{Patient|Practitioner|Appointment|Encounter|AuditEvent}/{id}
    POST {fhir}/AuditEvent                  conditional create: If-None-Exist
                                            entity:identifier=system|value (200 when one
                                            matches, 412 when several; ignore_if_none_exist
                                            makes it ignore the header, as servers without
                                            conditional create do)
    GET  {fhir}/AuditEvent?...              search (a system read token): entity (reference),
                                            entity:identifier, agent, date (eq/ne/gt/ge/lt/le),
                                            type, subtype (tokens), _count, _sort=date|-date;
                                            a searchset Bundle with total and a "next" link
                                            while more matches follow
    GET  authorize (EHR launch -> 302; standalone -> sign-in page), GET signin, POST token,
         GET jwks: see ``EhrProfile.authorization_endpoint`` / ``token_endpoint`` / ``jwks_uri``
    POST {base}/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus       default
    POST {base}/epic/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus  epic

and, shared::

    GET  {base}/                                   today's appointments (?config=, ?config_epic=,
                                                   ?config_oracle=: connector config ids), each with
                                                   the write-backs it received; the group visit
    GET  {base}/writebacks                          the same write-backs as JSON (the page polls it)
    GET  {base}/fhir/r4/.well-known/jwks.json      the default profile's key (older location)
    GET  {base}/fhir/dstu2/metadata (+ /.well-known/smart-configuration)   a DSTU2 server
    GET  {base}/fhir/no-pkce/metadata (+ smart-configuration advertising only "plain" PKCE)

Launches, codes and tokens belong to the profile that issued them: another profile's authorize,
token, FHIR or Epic endpoint refuses them, as another EHR would. What it keeps is bounded: the
newest :data:`MAX_AUDIT_EVENTS` AuditEvents, :data:`MAX_EPIC_CALLS` Epic calls and
:data:`MAX_LAUNCHES` launch tokens (the oldest go first).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from devtools.sandbox import seed

__all__ = [
    "ENDPOINTS",
    "ORACLE_TENANT_ID",
    "PROFILE_NAMES",
    "EhrProfile",
    "LaunchContext",
    "ProfileName",
    "SandboxEhr",
    "find_signin_link",
]

UserKind = Literal["clinician", "patient"]
ProfileName = Literal["default", "epic", "oracle"]
PROFILE_NAMES: tuple[ProfileName, ...] = ("default", "epic", "oracle")
ENDPOINTS = frozenset(
    {"token", "authorize", "fhir", "auditevent", "epic", "backend-token", "discovery"}
)
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")
CODE_TTL = 60.0
LAUNCH_TTL = 8 * 3600.0
SIGNIN_TTL = 600.0
USER_TOKEN_TTL = 3600
SYSTEM_TOKEN_TTL = 300
ASSERTION_MAX_LIFETIME = 300.0
CLOCK_SKEW = 5.0
JWKS_CACHE_TTL = 30.0
FHIR_JSON = "application/fhir+json; charset=utf-8"
READABLE_TYPES = ("Patient", "Practitioner", "Appointment", "Encounter", "AuditEvent")
EPIC_STATUS_PATH = "/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus"
# Confirmed from Epic integrations: ConferenceID, ExternalID, ExternalIDType, VendorName and
# ConnectionStatus. VendorName is accepted but not required.
EPIC_REQUIRED_PARAMS = ("ConferenceID", "ExternalID", "ExternalIDType", "ConnectionStatus")
# A made-up Millennium tenant (Oracle Health URLs are scoped by a tenant GUID).
ORACLE_TENANT_ID = "6f1c9e2a-4b7d-4e38-9a05-d2c81b3e7f94"
_ORACLE_OAUTH = f"/oracle/tenants/{ORACLE_TENANT_ID}/protocols/oauth2/profiles/smart-v1"
# Bounds on what the sandbox keeps in memory (a long `make run` session stays small).
MAX_AUDIT_EVENTS = 2000
MAX_EPIC_CALLS = 2000
MAX_LAUNCHES = 5000
AUDIT_SEARCH_PAGE = 100  # entries per searchset without _count
AUDIT_SEARCH_MAX_COUNT = 1000
AUDIT_SEARCH_PARAMS = (
    "entity",
    "entity:identifier",
    "agent",
    "date",
    "type",
    "subtype",
    "_count",
    "_sort",
    "_offset",  # what the searchset's "next" link carries
)
WRITEBACKS_SHOWN = 20  # per appointment on the page
_PKCE_CHALLENGE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_PKCE_VERIFIER_RE = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
_SCOPE_RE = re.compile(r"^(patient|user|system)/(\*|[A-Za-z]+)\.(read|write|\*|c?r?u?d?s?)$")
_SIGNIN_LINK_RE = re.compile(r'<a class="user" data-user-id="([^"]+)" href="([^"]+)"')
_DENY_LINK_RE = re.compile(r'<a class="deny" href="([^"]+)"')


def find_signin_link(page_html: str, user_id: str | None = None, *, deny: bool = False) -> str:
    """The href of a sign-in page's user link (default: the first, i.e. the analyst) or Deny."""
    if deny:
        match = _DENY_LINK_RE.search(page_html)
        if not match:
            raise LookupError("no Deny link on the page")
        return html.unescape(match.group(1))
    for found in _SIGNIN_LINK_RE.finditer(page_html):
        if user_id is None or html.unescape(found.group(1)) == user_id:
            return html.unescape(found.group(2))
    raise LookupError(f"no sign-in link for user {user_id!r}")


@dataclass(frozen=True)
class _ProfileSpec:
    """Where a profile's endpoints live and how it passes launch context."""

    name: ProfileName
    label: str
    vendor: str  # the connector config's ``ehrVendor`` for an EHR like this one
    fhir_path: str
    issuer_path: str  # on the authorization server's origin
    authorize_path: str
    signin_path: str
    token_path: str
    jwks_path: str
    epic_status_path: str | None
    separate_auth_host: bool  # the authorization server answers on another host name
    openid_configuration_at_fhir_base: bool
    context: Literal["appointment", "epic", "encounter"]


_SPECS: dict[ProfileName, _ProfileSpec] = {
    "default": _ProfileSpec(
        name="default",
        label="Generic SMART on FHIR EHR",
        vendor="smart",
        fhir_path="/fhir/r4",
        issuer_path="/oauth2",
        authorize_path="/oauth2/authorize",
        signin_path="/oauth2/signin",
        token_path="/oauth2/token",
        jwks_path="/oauth2/jwks",
        epic_status_path=EPIC_STATUS_PATH,
        separate_auth_host=False,
        openid_configuration_at_fhir_base=True,
        context="appointment",
    ),
    "epic": _ProfileSpec(
        name="epic",
        label="Epic",
        vendor="epic",
        fhir_path="/epic/api/FHIR/R4",
        issuer_path="/epic/oauth2",
        authorize_path="/epic/oauth2/authorize",
        signin_path="/epic/oauth2/signin",
        token_path="/epic/oauth2/token",
        jwks_path="/epic/api/epic/2019/Security/Open/PublicKeys/530005/OIDC",
        epic_status_path="/epic" + EPIC_STATUS_PATH,
        separate_auth_host=False,
        openid_configuration_at_fhir_base=True,
        context="epic",
    ),
    "oracle": _ProfileSpec(
        name="oracle",
        label="Oracle Health (Millennium)",
        vendor="oracle",
        fhir_path=f"/oracle/r4/{ORACLE_TENANT_ID}",
        issuer_path=f"/oracle/tenants/{ORACLE_TENANT_ID}/oidc/idsp/",
        authorize_path=f"{_ORACLE_OAUTH}/personas/provider/authorize",
        signin_path=f"{_ORACLE_OAUTH}/personas/provider/signin",
        token_path=f"{_ORACLE_OAUTH}/token",
        jwks_path="/oracle/jwk",
        epic_status_path=None,
        separate_auth_host=True,
        openid_configuration_at_fhir_base=False,
        context="encounter",
    ),
}


@dataclass(frozen=True)
class LaunchContext:
    """What a launch token stands for: who clicked, in which visit, at which EHR profile."""

    user: UserKind
    fhir_user: str  # relative reference, "Practitioner/x" or "Patient/y"
    patient_id: str
    appointment_id: str
    encounter_id: str | None
    conference_id: str | None
    deny: bool
    expires_at: float
    profile: ProfileName = "default"


@dataclass
class _Fault:
    status: int
    remaining: int
    delay: float


@dataclass
class _AuthCode:
    profile: ProfileName
    client_id: str
    redirect_uri: str
    code_challenge: str
    scopes: list[str]
    nonce: str | None
    fhir_user: str
    launch: LaunchContext | None
    expires_at: float
    used: bool = False
    access_tokens: list[str] = field(default_factory=list)


@dataclass
class _AccessToken:
    profile: ProfileName
    kind: Literal["user", "system"]
    client_id: str
    scopes: frozenset[str]
    expires_at: float
    patient_id: str | None = None
    revoked: bool = False


@dataclass
class _PendingSignin:
    profile: ProfileName
    client_id: str
    redirect_uri: str
    state: str
    code_challenge: str
    scopes: list[str]
    nonce: str | None
    expires_at: float


class _OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


class _DownGuard:
    """ASGI middleware: every endpoint answers 503 while the EHR is set down."""

    def __init__(self, app: ASGIApp, ehr: SandboxEhr) -> None:
        self.app = app
        self.ehr = ehr

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.ehr.is_down:
            response = Response(
                "Sandbox EHR is down (set_down)",
                status_code=503,
                media_type="text/plain",
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


_LAUNCH_BUTTONS: dict[ProfileName, tuple[tuple[UserKind, str], ...]] = {
    "default": (
        ("clinician", "Start virtual visit (clinician)"),
        ("patient", "Start virtual visit (patient portal)"),
    ),
    "epic": (
        ("clinician", "Start virtual visit (clinician — Hyperspace)"),
        ("patient", "Start virtual visit (patient — MyChart)"),
    ),
    "oracle": (
        ("clinician", "Start virtual visit (clinician — PowerChart)"),
        ("patient", "Start virtual visit (patient — HealtheLife)"),
    ),
}
_KEY_LOCK = threading.Lock()
_SIGNING_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def _signing_key(name: str) -> rsa.RSAPrivateKey:
    """A profile's id_token signing key: generated once per process (RSA generation is slow).
    Each profile has its own, as separate EHRs do."""
    with _KEY_LOCK:
        key = _SIGNING_KEYS.get(name)
        if key is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _SIGNING_KEYS[name] = key
        return key


def _b64url_sha256(value: str) -> str:
    digest = hashlib.sha256(value.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _outcome(status: int, code: str, diagnostics: str) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return Response(json.dumps(body), status_code=status, media_type=FHIR_JSON)


def _identifier_search(query: str) -> tuple[str, str] | None:
    """``(system, value)`` of ``entity:identifier=system|value`` (URL-encoded or not)."""
    from urllib.parse import unquote

    name, eq, raw = query.strip().partition("=")
    if not eq or unquote(name) != "entity:identifier":
        return None
    system, bar, value = unquote(raw).partition("|")
    if not bar or not system or not value or "&" in value:
        return None
    return system, value


def _append_bounded(items: list[Any], item: Any, cap: int) -> None:
    """Appends ``item``, dropping the oldest beyond ``cap``."""
    items.append(item)
    if len(items) > cap:
        del items[: len(items) - cap]


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")


def _date_test(value: str) -> Callable[[dict[str, Any]], bool]:
    """FHIR ``date`` search on ``recorded``: a prefix and a date or dateTime, whose precision is
    the range it stands for (a day, a second, a microsecond)."""
    prefix, text = ("eq", value)
    if value[:2] in _DATE_PREFIXES:
        prefix, text = value[:2], value[2:]
    try:
        start = _instant(text)
    except ValueError:
        raise ValueError(f"date: {value!r} is not a FHIR date or dateTime") from None
    if "T" not in text:
        end = start + timedelta(days=1)
    elif "." in text:
        end = start + timedelta(microseconds=1)
    else:
        end = start + timedelta(seconds=1)

    def test(resource: dict[str, Any]) -> bool:
        try:
            at = _instant(str(resource.get("recorded", "")))
        except ValueError:
            return False
        return {
            "eq": start <= at < end,
            "ne": not start <= at < end,
            "gt": at >= end,
            "lt": at < start,
            "ge": at >= start,
            "le": at < end,
        }[prefix]

    return test


def _token_test(
    value: str, codings: Callable[[dict[str, Any]], Iterable[Any]]
) -> Callable[[dict[str, Any]], bool]:
    """FHIR token search (``code``, ``system|code``, ``|code``; a comma means "or")."""
    wanted: list[tuple[str | None, str]] = []
    for part in value.split(","):
        system, bar, code = part.partition("|")
        wanted.append((system, code) if bar else (None, part))

    def test(resource: dict[str, Any]) -> bool:
        for coding in codings(resource):
            if not isinstance(coding, dict):
                continue
            for system, code in wanted:
                if coding.get("code") == code and (
                    system is None or (coding.get("system") or "") == system
                ):
                    return True
        return False

    return test


def _reference_test(
    value: str, base: str, references: Callable[[dict[str, Any]], Iterable[Any]]
) -> Callable[[dict[str, Any]], bool]:
    """FHIR reference search (``Type/id`` or an absolute URL on this server; comma: "or")."""
    wanted = {_relative(part, base) for part in value.split(",")}
    if not all(re.fullmatch(r"[A-Za-z]+/[A-Za-z0-9\-.]{1,64}", w) for w in wanted):
        raise ValueError(f"a reference search needs Type/id values, not {value!r}")

    def test(resource: dict[str, Any]) -> bool:
        return any(_relative(str(ref), base) in wanted for ref in references(resource) if ref)

    return test


def _identifier_test(system: str, value: str) -> Callable[[dict[str, Any]], bool]:
    def test(resource: dict[str, Any]) -> bool:
        for entity in resource.get("entity", []):
            identifier = entity.get("what", {}).get("identifier", {})
            if identifier.get("system") == system and str(identifier.get("value")) == value:
                return True
        return False

    return test


def _recorded(resource: dict[str, Any]) -> datetime:
    try:
        return _instant(str(resource.get("recorded", "")))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _relative(reference: str, base: str) -> str:
    return reference[len(base) + 1 :] if reference.startswith(base + "/") else reference


@dataclass(frozen=True)
class _AuditSearch:
    """An AuditEvent search (the parameters of ``AUDIT_SEARCH_PARAMS``; each one narrows it)."""

    tests: tuple[Callable[[dict[str, Any]], bool], ...]
    count: int
    newest_first: bool | None
    offset: int = 0

    @classmethod
    def parse(cls, items: Iterable[tuple[str, str]], base: str) -> _AuditSearch:
        tests: list[Callable[[dict[str, Any]], bool]] = []
        count, newest_first, offset = AUDIT_SEARCH_PAGE, None, 0
        for name, value in items:
            if name == "_count":
                if not value.isdigit() or int(value) > AUDIT_SEARCH_MAX_COUNT:
                    raise ValueError(f"_count must be 0..{AUDIT_SEARCH_MAX_COUNT}")
                count = int(value)
            elif name == "_offset":
                if not value.isdigit():
                    raise ValueError("_offset must be a number")
                offset = int(value)
            elif name == "_sort":
                if value not in ("date", "-date"):
                    raise ValueError("_sort supports date and -date")
                newest_first = value == "-date"
            elif name == "entity:identifier":
                wanted = _identifier_search(f"entity:identifier={quote(value, safe='')}")
                if wanted is None:
                    raise ValueError("entity:identifier needs system|value")
                tests.append(_identifier_test(*wanted))
            elif name == "entity":
                tests.append(
                    _reference_test(
                        value,
                        base,
                        lambda r: [e.get("what", {}).get("reference") for e in r.get("entity", [])],
                    )
                )
            elif name == "agent":
                tests.append(
                    _reference_test(
                        value,
                        base,
                        lambda r: [a.get("who", {}).get("reference") for a in r.get("agent", [])],
                    )
                )
            elif name == "date":
                tests.append(_date_test(value))
            elif name == "type":
                tests.append(_token_test(value, lambda r: [r.get("type")]))
            elif name == "subtype":
                tests.append(_token_test(value, lambda r: r.get("subtype") or []))
            else:
                raise ValueError(
                    f"Unsupported search parameter {name!r}; this server supports "
                    + ", ".join(AUDIT_SEARCH_PARAMS)
                )
        return cls(tuple(tests), count, newest_first, offset)

    def run(self, stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
        matches = [r for r in stored if all(test(r) for test in self.tests)]
        if self.newest_first is not None:
            matches.sort(key=_recorded, reverse=self.newest_first)
        return matches


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title, quote=False)}</title><style>{_CSS}</style></head>"
        f"<body><header>Sandbox EHR</header><main><h1>{html.escape(title, quote=False)}</h1>{body}"
        "</main></body></html>",
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#7a1f3d;color:#fff;padding:.6rem 1.2rem;font-weight:600}
main{padding:1rem 1.5rem;max-width:72rem}
section.profile{margin:1.5rem 0}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #d8dee4;padding:.5rem .6rem;text-align:left;vertical-align:top}
th{background:#eef1f4}
form label{display:inline-block;margin:0 1rem .4rem 0}
a.launch,a.user,a.deny,button{display:inline-block;margin:.15rem 0;padding:.35rem .7rem;
border-radius:4px;text-decoration:none;border:0;font-size:.9rem;cursor:pointer}
a.launch[data-role=clinician]{background:#1f5f99;color:#fff}
a.launch[data-role=patient]{background:#2f7d4f;color:#fff}
a.user{background:#1f5f99;color:#fff}
a.deny{background:#a33;color:#fff}
.badge{background:#ffe9a8;border-radius:3px;padding:0 .3rem;font-size:.8rem}
.error{background:#fff0f0;border:1px solid #e0a0a0;padding:.8rem}
a.group-launch{display:inline-block;padding:.35rem .7rem;border-radius:4px;
text-decoration:none;font-size:.9rem;background:#1f5f99;color:#fff}
a.group-launch[data-role=patient]{background:#2f7d4f}
ul.writebacks{margin:0;padding-left:1rem;font-size:.85rem}
table.group-visit{margin-top:.5rem}
.note{font-size:.9rem}
"""


def _other_loopback_host(origin: str) -> str:
    """``origin`` with its host name swapped: ``127.0.0.1`` <-> ``localhost`` (same port)."""
    parts = urlsplit(origin)
    host = "127.0.0.1" if (parts.hostname or "").lower() == "localhost" else "localhost"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}"


class EhrProfile:
    """One EHR the sandbox stands for (``default``, ``epic`` or ``oracle``): its URLs, launch
    helpers and its own inspection lists. Get one with :meth:`SandboxEhr.profile`."""

    def __init__(self, ehr: SandboxEhr, spec: _ProfileSpec) -> None:
        self._ehr = ehr
        self._spec = spec
        self.name: ProfileName = spec.name
        self.label = spec.label
        self.vendor = spec.vendor
        # The connector config whose launch URLs the EHR page's buttons open (None: no buttons).
        self.config_id: str | None = None
        # What reached this profile (also in the SandboxEhr-wide lists of the same names).
        self.audit_events: list[dict[str, Any]] = []
        self.epic_status_calls: list[dict[str, Any]] = []
        self.token_requests: list[dict[str, str]] = []
        self._key = _signing_key(spec.name)
        public_jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        self._kid = _b64url_sha256(public_jwk["n"])[:16]
        public_jwk.update({"kid": self._kid, "use": "sig", "alg": "RS256"})
        self._public_jwk = public_jwk

    def __repr__(self) -> str:
        return f"<EhrProfile {self.name}>"

    # --- URLs -------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The sandbox server's base URL (the FHIR server's origin)."""
        return self._ehr.base_url

    @property
    def auth_base_url(self) -> str:
        """The authorization server's origin: the FHIR server's, or (oracle) its own host."""
        if self._spec.separate_auth_host:
            return _other_loopback_host(self.base_url)
        return self.base_url

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}{self._spec.fhir_path}"

    @property
    def issuer(self) -> str:
        """The OAuth/OpenID issuer: never the FHIR base (as at real EHRs)."""
        return f"{self.auth_base_url}{self._spec.issuer_path}"

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.auth_base_url}{self._spec.authorize_path}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.auth_base_url}{self._spec.token_path}"

    @property
    def signin_endpoint(self) -> str:
        """Where the standalone sign-in page's links go."""
        return f"{self.auth_base_url}{self._spec.signin_path}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.auth_base_url}{self._spec.jwks_path}"

    @property
    def smart_configuration_url(self) -> str:
        return f"{self.fhir_base}/.well-known/smart-configuration"

    @property
    def openid_configuration_url(self) -> str:
        """OpenID Connect Discovery's location for :attr:`issuer`."""
        return f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"

    @property
    def epic_status_url(self) -> str | None:
        """Epic's SetExternalConnectionStatus (None for a profile without it: oracle)."""
        path = self._spec.epic_status_path
        return f"{self.base_url}{path}" if path else None

    @property
    def fhir_host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def auth_host(self) -> str:
        return urlsplit(self.auth_base_url).hostname or ""

    @property
    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._public_jwk)]}

    # --- launches ---------------------------------------------------------------------------------

    def appointments(self) -> list[seed.SeedAppointment]:
        """Today's appointments this EHR can launch, by start time (oracle: those with an
        encounter, since its launch context names the encounter only)."""
        ordered = sorted(seed.APPOINTMENTS.values(), key=lambda a: (a.start(), a.id))
        if self._spec.context == "encounter":
            return [a for a in ordered if a.encounter_id]
        return ordered

    def make_launch(
        self,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None = None,
        conference_id: str | None = None,
        deny: bool = False,
    ) -> str:
        """A launch token (what the EHR puts in ``launch=``) for that visit and user."""
        token, _ = self._ehr._new_launch(
            self,
            appointment_id=appointment_id,
            user=user,
            practitioner_id=practitioner_id,
            conference_id=conference_id,
            deny=deny,
        )
        return token

    def launch_url(
        self,
        config_id: str,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None = None,
        conference_id: str | None = None,
        deny: bool = False,
    ) -> str:
        """The connector's launch URL this EHR opens for that visit and user: ``iss`` (the FHIR
        base) and ``launch``; epic adds ``sessionId=<conference id>`` for a group visit, as
        Epic's group-visit integration record does (``%CONFERENCEID%``)."""
        token, ctx = self._ehr._new_launch(
            self,
            appointment_id=appointment_id,
            user=user,
            practitioner_id=practitioner_id,
            conference_id=conference_id,
            deny=deny,
        )
        kind = "provider" if user == "clinician" else "patient"
        params = {"iss": self.fhir_base, "launch": token}
        if self._spec.context == "epic" and ctx.conference_id:
            params["sessionId"] = ctx.conference_id
        connector = self._ehr.connector_url
        return f"{connector}/api/launch/{kind}/{quote(config_id, safe='')}?{urlencode(params)}"

    # --- internals --------------------------------------------------------------------------------

    @property
    def spec(self) -> _ProfileSpec:
        return self._spec

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid})

    def _serves_host(self, host: str | None, where: Literal["fhir", "auth"]) -> bool:
        """Oracle's FHIR server and authorization server are separate hosts: each answers only
        on its own host name."""
        if not self._spec.separate_auth_host:
            return True
        expected = self.fhir_host if where == "fhir" else self.auth_host
        return (host or "").lower() == expected.lower()

    def _fhir_context(self, ctx: LaunchContext) -> list[dict[str, Any]]:
        if self._spec.context == "encounter":
            return []
        items: list[dict[str, Any]] = [{"reference": f"Appointment/{ctx.appointment_id}"}]
        if self._spec.context == "epic":
            if ctx.encounter_id:
                items.append({"reference": f"Encounter/{ctx.encounter_id}"})
            return items
        if ctx.conference_id:
            items.append(
                {"identifier": {"system": seed.CONFERENCE_ID_SYSTEM, "value": ctx.conference_id}}
            )
        return items


Handler = Callable[[Request, EhrProfile], Awaitable[Response]]


class SandboxEhr:
    """A strict SMART on FHIR EHR served as a Starlette app (see the module docstring).

    The properties without a profile (``fhir_base``, ``issuer``, ``authorization_endpoint``,
    ``make_launch``, ``launch_url`` ...) are the ``default`` profile's.
    """

    def __init__(
        self,
        *,
        connector_url: str,
        smart_client_id: str,
        connector_jwks_url: str | None = None,
        extra_redirect_uris: Sequence[str] = (),
    ) -> None:
        self.connector_url = connector_url.rstrip("/")
        self.smart_client_id = smart_client_id
        self.connector_jwks_url = connector_jwks_url
        self.redirect_uris: list[str] = [
            f"{self.connector_url}/api/launch/callback",
            f"{self.connector_url}/api/ehr-signin/callback",
            *extra_redirect_uris,
        ]
        # Refuse public (client_id only) token requests, like an EHR that registered the
        # connector as a confidential asymmetric client only.
        self.require_client_assertion = False
        # Ignore If-None-Exist on AuditEvent creates (and say so in the CapabilityStatement),
        # as FHIR servers without conditional create do: every POST stores a new resource.
        self.ignore_if_none_exist = False
        self.clock: Callable[[], float] = time.time
        # Every profile's calls (each profile also keeps its own lists).
        self.audit_events: list[dict[str, Any]] = []
        self.epic_status_calls: list[dict[str, Any]] = []
        # (grant_type, auth method "private_key_jwt" or "none") per successful token request
        self.token_requests: list[dict[str, str]] = []

        self._lock = threading.Lock()
        self._base_url: str | None = None
        self._down = False
        self._faults: dict[str, list[_Fault]] = {}
        self._launches: dict[str, LaunchContext] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._tokens: dict[str, _AccessToken] = {}
        self._signins: dict[str, _PendingSignin] = {}
        self._jtis: dict[str, float] = {}
        self._jwks_cache: tuple[float, dict[str, Any]] | None = None
        self._audit_by_id: dict[str, tuple[ProfileName, dict[str, Any]]] = {}  # oldest first
        # (received at, profile, parameters) per Epic connection-status call, for the page
        self._epic_log: deque[tuple[float, ProfileName, dict[str, Any]]] = deque(
            maxlen=MAX_EPIC_CALLS
        )
        # (profile, entity identifier system, value) -> ids: conditional create and search
        self._audit_by_identifier: dict[tuple[str, str, str], list[str]] = {}
        self._profiles: dict[ProfileName, EhrProfile] = {
            name: EhrProfile(self, _SPECS[name]) for name in PROFILE_NAMES
        }

        self.app = Starlette(routes=self._routes(), middleware=[Middleware(_DownGuard, ehr=self)])

    # --- profiles -------------------------------------------------------------------------------

    def profile(self, name: str = "default") -> EhrProfile:
        """The profile ``default``, ``epic`` or ``oracle``."""
        for key, profile in self._profiles.items():
            if key == name:
                return profile
        raise ValueError(f"profile must be one of {', '.join(PROFILE_NAMES)}")

    @property
    def profiles(self) -> tuple[EhrProfile, ...]:
        return tuple(self._profiles.values())

    @property
    def default_config_id(self) -> str | None:
        """The default profile's ``config_id`` (the page's launch buttons)."""
        return self._profiles["default"].config_id

    @default_config_id.setter
    def default_config_id(self, value: str | None) -> None:
        self._profiles["default"].config_id = value

    # --- configuration and test controls --------------------------------------------------------

    def set_base_url(self, base_url: str) -> None:
        self._base_url = base_url.rstrip("/")

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("SandboxEhr.set_base_url() has not been called")
        return self._base_url

    @property
    def fhir_base(self) -> str:
        return self._profiles["default"].fhir_base

    @property
    def issuer(self) -> str:
        return self._profiles["default"].issuer

    @property
    def dstu2_base(self) -> str:
        return f"{self.base_url}/fhir/dstu2"

    @property
    def no_pkce_base(self) -> str:
        return f"{self.base_url}/fhir/no-pkce"

    @property
    def authorization_endpoint(self) -> str:
        return self._profiles["default"].authorization_endpoint

    @property
    def token_endpoint(self) -> str:
        return self._profiles["default"].token_endpoint

    @property
    def jwks_uri(self) -> str:
        return self._profiles["default"].jwks_uri

    @property
    def epic_status_url(self) -> str:
        return f"{self.base_url}{EPIC_STATUS_PATH}"

    @property
    def public_jwks(self) -> dict[str, Any]:
        return self._profiles["default"].public_jwks

    @property
    def is_down(self) -> bool:
        with self._lock:
            return self._down

    def set_down(self, down: bool) -> None:
        with self._lock:
            self._down = down

    def fail_next(
        self, endpoint: str, *, status: int = 500, count: int = 1, delay: float = 0.0
    ) -> None:
        """The next ``count`` requests to ``endpoint`` (at any profile) fail with ``status``
        after ``delay`` s.

        ``authorize`` faults redirect back with ``error=access_denied`` (``status=503`` answers a
        503 page instead). A ``status`` below 400 only delays, then answers normally.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.setdefault(endpoint, []).append(_Fault(status, count, delay))

    def reset(self) -> None:
        """Clear faults, the down flag, the inspection lists and restore the clock,
        ``require_client_assertion`` and ``ignore_if_none_exist`` (issued tokens, codes,
        launches, config ids and stored AuditEvents are kept)."""
        with self._lock:
            self._faults.clear()
            self._down = False
            self.clock = time.time
            self.require_client_assertion = False
            self.ignore_if_none_exist = False
            self.audit_events.clear()
            self.epic_status_calls.clear()
            self.token_requests.clear()
            for profile in self._profiles.values():
                profile.audit_events.clear()
                profile.epic_status_calls.clear()
                profile.token_requests.clear()

    def clear_writebacks(self) -> None:
        """Forget every stored AuditEvent and Epic call (what searches and the page show)."""
        with self._lock:
            self._audit_by_id.clear()
            self._audit_by_identifier.clear()
            self._epic_log.clear()

    def make_launch(
        self,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None = None,
        conference_id: str | None = None,
        deny: bool = False,
    ) -> str:
        """A default-profile launch token (what the EHR puts in ``launch=``)."""
        return self._profiles["default"].make_launch(
            appointment_id=appointment_id,
            user=user,
            practitioner_id=practitioner_id,
            conference_id=conference_id,
            deny=deny,
        )

    def launch_url(
        self,
        config_id: str,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None = None,
        conference_id: str | None = None,
        deny: bool = False,
    ) -> str:
        """The connector's launch URL the default profile opens for this visit and user."""
        return self._profiles["default"].launch_url(
            config_id,
            appointment_id=appointment_id,
            user=user,
            practitioner_id=practitioner_id,
            conference_id=conference_id,
            deny=deny,
        )

    def _new_launch(
        self,
        profile: EhrProfile,
        *,
        appointment_id: str,
        user: UserKind,
        practitioner_id: str | None,
        conference_id: str | None,
        deny: bool,
    ) -> tuple[str, LaunchContext]:
        appt = seed.APPOINTMENTS.get(appointment_id)
        if appt is None:
            raise ValueError(f"unknown appointment {appointment_id!r}")
        if user == "clinician":
            prac = practitioner_id or appt.practitioner_id
            if prac not in seed.PRACTITIONERS:
                raise ValueError(f"unknown practitioner {prac!r}")
            fhir_user = f"Practitioner/{prac}"
        elif user == "patient":
            fhir_user = f"Patient/{appt.patient_id}"
        else:
            raise ValueError("user must be 'clinician' or 'patient'")
        conference = conference_id or appt.conference_id
        if profile.spec.context == "encounter":
            if not appt.encounter_id:
                raise ValueError(
                    f"appointment {appointment_id!r} has no encounter; the {profile.name} "
                    "profile launches with an encounter only"
                )
            if conference_id:
                raise ValueError(f"the {profile.name} profile passes no conference id")
            conference = None
        ctx = LaunchContext(
            user=user,
            fhir_user=fhir_user,
            patient_id=appt.patient_id,
            appointment_id=appt.id,
            encounter_id=appt.encounter_id,
            conference_id=conference,
            deny=deny,
            expires_at=self.clock() + LAUNCH_TTL,
            profile=profile.name,
        )
        token = secrets.token_urlsafe(24)
        with self._lock:
            now = self.clock()
            for key in [k for k, v in self._launches.items() if v.expires_at < now]:
                del self._launches[key]
            while len(self._launches) >= MAX_LAUNCHES:  # a page view mints a few: stay bounded
                del self._launches[next(iter(self._launches))]
            self._launches[token] = ctx
        return token, ctx

    # --- internals -----------------------------------------------------------------------------

    @staticmethod
    def _bind(
        handler: Handler, profile: EhrProfile, where: Literal["fhir", "auth"]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not profile._serves_host(request.url.hostname, where):
                return Response("Not Found", status_code=404, media_type="text/plain")
            return await handler(request, profile)

        endpoint.__name__ = f"{profile.name}_{handler.__name__.lstrip('_')}"
        return endpoint

    def _profile_routes(self, profile: EhrProfile) -> list[Route]:
        spec = profile.spec
        fhir = spec.fhir_path
        bind = self._bind
        routes = [
            Route(
                f"{fhir}/.well-known/smart-configuration",
                bind(self._smart_config, profile, "fhir"),
                methods=["GET"],
            ),
            Route(
                f"{spec.issuer_path.rstrip('/')}/.well-known/openid-configuration",
                bind(self._openid_config, profile, "auth"),
                methods=["GET"],
            ),
        ]
        if spec.openid_configuration_at_fhir_base:
            routes.append(
                Route(
                    f"{fhir}/.well-known/openid-configuration",
                    bind(self._openid_config, profile, "fhir"),
                    methods=["GET"],
                )
            )
        routes += [
            Route(spec.jwks_path, bind(self._jwks, profile, "auth"), methods=["GET"]),
            Route(f"{fhir}/metadata", bind(self._metadata, profile, "fhir"), methods=["GET"]),
            Route(
                f"{fhir}/AuditEvent",
                bind(self._post_audit_event, profile, "fhir"),
                methods=["POST"],
            ),
            Route(
                f"{fhir}/AuditEvent",
                bind(self._search_audit_events, profile, "fhir"),
                methods=["GET"],
            ),
            Route(
                f"{fhir}/{{rtype}}/{{rid}}", bind(self._fhir_read, profile, "fhir"), methods=["GET"]
            ),
            Route(spec.authorize_path, bind(self._authorize, profile, "auth"), methods=["GET"]),
            Route(spec.signin_path, bind(self._signin, profile, "auth"), methods=["GET"]),
            Route(spec.token_path, bind(self._token, profile, "auth"), methods=["POST"]),
        ]
        if spec.epic_status_path:
            routes.append(
                Route(
                    spec.epic_status_path,
                    bind(self._epic_status, profile, "fhir"),
                    methods=["POST"],
                )
            )
        return routes

    def _routes(self) -> list[Route]:
        default = self._profiles["default"]
        routes = [
            Route("/", self._home, methods=["GET"]),
            Route("/writebacks", self._writebacks_json, methods=["GET"]),
            Route("/smart-style.json", self._smart_style, methods=["GET"]),
            # the default profile's key at its older location (before the FHIR read route)
            Route(
                "/fhir/r4/.well-known/jwks.json",
                self._bind(self._jwks, default, "fhir"),
                methods=["GET"],
            ),
        ]
        for profile in self._profiles.values():
            routes += self._profile_routes(profile)
        routes += [
            Route(
                "/fhir/{flavor}/.well-known/smart-configuration",
                self._flavor_smart_config,
                methods=["GET"],
            ),
            Route("/fhir/{flavor}/metadata", self._flavor_metadata, methods=["GET"]),
        ]
        return routes

    async def _take_fault(self, endpoint: str) -> _Fault | None:
        """Pops the next fault for ``endpoint``, sleeps its delay; returns it if it must fail."""
        with self._lock:
            queue = self._faults.get(endpoint)
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.pop(0)
            snapshot = _Fault(fault.status, fault.remaining, fault.delay)
        if snapshot.delay > 0:
            await asyncio.sleep(snapshot.delay)
        return snapshot if snapshot.status >= 400 else None

    def _bearer(
        self, request: Request, profile: EhrProfile
    ) -> tuple[_AccessToken | None, Response | None]:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None, self._unauthorized('Bearer realm="sandbox-ehr"')
        with self._lock:
            info = self._tokens.get(value.strip())
        if (
            info is None
            or info.profile != profile.name  # another EHR's token
            or info.revoked
            or info.expires_at <= self.clock()
        ):
            return None, self._unauthorized(
                'Bearer realm="sandbox-ehr", error="invalid_token", '
                'error_description="The access token is unknown, expired or revoked"'
            )
        return info, None

    @staticmethod
    def _unauthorized(challenge: str) -> Response:
        response = _outcome(401, "login", "Authorization: Bearer <valid access token> required")
        response.headers["WWW-Authenticate"] = challenge
        return response

    @staticmethod
    def _allowed_contexts(
        scopes: frozenset[str], rtype: str, action: Literal["read", "create"]
    ) -> set[str]:
        contexts: set[str] = set()
        for scope in scopes:
            match = _SCOPE_RE.match(scope)
            if not match or not match.group(3):
                continue
            ctx, scope_type, perm = match.groups()
            if scope_type not in ("*", rtype):
                continue
            if perm in ("read", "write", "*"):
                ok = perm == "*" or (perm == "read") == (action == "read")
            else:
                ok = ("r" if action == "read" else "c") in perm
            if ok:
                contexts.add(ctx)
        return contexts

    # --- discovery ------------------------------------------------------------------------------

    async def _discovery_fault(self) -> Response | None:
        fault = await self._take_fault("discovery")
        if fault:
            return JSONResponse({"error": "server_error"}, status_code=fault.status)
        return None

    @staticmethod
    def _smart_configuration(profile: EhrProfile, pkce: list[str]) -> dict[str, Any]:
        capabilities = [
            "launch-ehr",
            "launch-standalone",
            "client-public",
            "client-confidential-asymmetric",
            "context-banner",
            "context-style",
            "context-ehr-patient",
            "context-ehr-encounter",
            "sso-openid-connect",
            "permission-patient",
            "permission-user",
            "permission-v1",
            "permission-v2",
        ]
        return {
            "issuer": profile.issuer,
            "jwks_uri": profile.jwks_uri,
            "authorization_endpoint": profile.authorization_endpoint,
            "token_endpoint": profile.token_endpoint,
            "authorization_response_iss_parameter_supported": True,
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
            "scopes_supported": [
                "openid",
                "fhirUser",
                "launch",
                "launch/patient",
                "launch/encounter",
                "patient/*.rs",
                "user/*.rs",
                "patient/*.read",
                "user/*.read",
                "system/AuditEvent.c",
                "system/AuditEvent.write",
                "system/AuditEvent.rs",
                "system/AuditEvent.read",
            ],
            "response_types_supported": ["code"],
            "capabilities": capabilities,
            "code_challenge_methods_supported": pkce,
        }

    async def _smart_config(self, request: Request, profile: EhrProfile) -> Response:
        if fault := await self._discovery_fault():
            return fault
        return JSONResponse(self._smart_configuration(profile, ["S256"]))

    async def _flavor_smart_config(self, request: Request) -> Response:
        """The misconfigured bases (a DSTU2 server, a server without S256) on the default
        profile's authorization server."""
        if fault := await self._discovery_fault():
            return fault
        flavor = request.path_params["flavor"]
        default = self._profiles["default"]
        if flavor == "dstu2":
            doc = self._smart_configuration(default, ["S256"])
        elif flavor == "no-pkce":
            doc = self._smart_configuration(default, ["plain"])
        else:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return JSONResponse(doc)

    async def _openid_config(self, request: Request, profile: EhrProfile) -> Response:
        if fault := await self._discovery_fault():
            return fault
        return JSONResponse(
            {
                "issuer": profile.issuer,
                "jwks_uri": profile.jwks_uri,
                "authorization_endpoint": profile.authorization_endpoint,
                "token_endpoint": profile.token_endpoint,
                "authorization_response_iss_parameter_supported": True,
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "fhirUser", "profile"],
                "claims_supported": [
                    "iss",
                    "sub",
                    "aud",
                    "exp",
                    "iat",
                    "auth_time",
                    "nonce",
                    "fhirUser",
                ],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def _jwks(self, request: Request, profile: EhrProfile) -> Response:
        return JSONResponse(profile.public_jwks)

    async def _smart_style(self, request: Request) -> Response:
        return JSONResponse(
            {
                "color_background": "#f4f6f8",
                "color_highlight": "#7a1f3d",
                "font_family_body": "system-ui, sans-serif",
            }
        )

    @staticmethod
    def _r4_capability_statement(
        base: str, security: dict[str, Any], *, conditional_create: bool = True
    ) -> dict[str, Any]:
        resources: list[dict[str, Any]] = [
            {"type": t, "interaction": [{"code": "read"}]}
            for t in ("Patient", "Practitioner", "Appointment", "Encounter")
        ]
        resources.append(
            {
                "type": "AuditEvent",
                "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
                "conditionalCreate": conditional_create,
                "searchParam": [
                    {"name": "entity", "type": "reference"},
                    {"name": "agent", "type": "reference"},
                    {"name": "date", "type": "date"},
                    {"name": "type", "type": "token"},
                    {"name": "subtype", "type": "token"},
                ],
            }
        )
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2024-01-01",
            "kind": "instance",
            "software": {"name": "Sandbox SMART EHR", "version": "1.0"},
            "implementation": {"description": "Sandbox SMART EHR", "url": base},
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [{"mode": "server", "security": security, "resource": resources}],
        }

    async def _metadata(self, request: Request, profile: EhrProfile) -> Response:
        if fault := await self._discovery_fault():
            return fault
        doc = self._r4_capability_statement(
            profile.fhir_base,
            self._security(profile),
            conditional_create=not self.ignore_if_none_exist,
        )
        return Response(json.dumps(doc), media_type=FHIR_JSON)

    async def _flavor_metadata(self, request: Request) -> Response:
        if fault := await self._discovery_fault():
            return fault
        flavor = request.path_params["flavor"]
        security = self._security(self._profiles["default"])
        if flavor == "dstu2":
            doc: dict[str, Any] = {
                "resourceType": "Conformance",
                "status": "active",
                "date": "2016-01-01",
                "kind": "instance",
                "fhirVersion": "1.0.2",
                "acceptUnknown": "no",
                "format": ["application/json+fhir"],
                "rest": [{"mode": "server", "security": security}],
            }
            return Response(json.dumps(doc), media_type="application/json+fhir; charset=utf-8")
        if flavor != "no-pkce":
            return _outcome(404, "not-found", "Unknown FHIR endpoint")
        doc = self._r4_capability_statement(self.no_pkce_base, security)
        return Response(json.dumps(doc), media_type=FHIR_JSON)

    @staticmethod
    def _security(profile: EhrProfile) -> dict[str, Any]:
        return {
            "extension": [
                {
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": profile.authorization_endpoint},
                        {"url": "token", "valueUri": profile.token_endpoint},
                    ],
                }
            ],
            "service": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                            "code": "SMART-on-FHIR",
                        }
                    ]
                }
            ],
        }

    # --- authorize ------------------------------------------------------------------------------

    def _error_page(self, title: str, detail: str, status: int = 400) -> HTMLResponse:
        return _page(
            title,
            f'<div class="error oauth-error"><p>{html.escape(detail)}</p>'
            "<p>The sign-in request was not sent back to the application because it could not "
            "be verified.</p></div>",
            status,
        )

    def _redirect_error(
        self,
        profile: EhrProfile,
        redirect_uri: str,
        state: str | None,
        error: str,
        description: str,
    ) -> Response:
        params = {"error": error, "error_description": description}
        if state:
            params["state"] = state
        params["iss"] = profile.issuer  # RFC 9207: error responses carry it too
        return RedirectResponse(self._with_query(redirect_uri, params), status_code=302)

    def _redirect_code(
        self, profile: EhrProfile, redirect_uri: str, code: str, state: str
    ) -> Response:
        params = {"code": code, "state": state, "iss": profile.issuer}  # RFC 9207
        return RedirectResponse(self._with_query(redirect_uri, params), status_code=302)

    @staticmethod
    def _with_query(url: str, params: dict[str, str]) -> str:
        return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"

    def _issue_code(
        self,
        *,
        profile: EhrProfile,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        scopes: list[str],
        nonce: str | None,
        fhir_user: str,
        launch: LaunchContext | None,
    ) -> str:
        code = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            for key in [k for k, v in self._codes.items() if v.expires_at + 600 < now]:
                del self._codes[key]
            self._codes[code] = _AuthCode(
                profile=profile.name,
                client_id=client_id,
                redirect_uri=redirect_uri,
                code_challenge=code_challenge,
                scopes=scopes,
                nonce=nonce,
                fhir_user=fhir_user,
                launch=launch,
                expires_at=now + CODE_TTL,
            )
        return code

    async def _authorize(self, request: Request, profile: EhrProfile) -> Response:
        items = request.query_params.multi_items()
        params = dict(items)
        client_id = params.get("client_id")
        redirect_uri = params.get("redirect_uri")
        if not client_id or client_id != self.smart_client_id:
            return self._error_page(
                "Unknown application", f"client_id {client_id!r} is not registered with this EHR."
            )
        if not redirect_uri or redirect_uri not in self.redirect_uris:
            return self._error_page(
                "Invalid redirect URI",
                f"redirect_uri {redirect_uri!r} is not registered for this application.",
            )
        state = params.get("state")

        def fail(error: str, description: str, with_state: bool = True) -> Response:
            assert redirect_uri is not None
            return self._redirect_error(
                profile, redirect_uri, state if with_state else None, error, description
            )

        fault = await self._take_fault("authorize")
        if fault:
            if fault.status == 503:
                return _page("EHR unavailable", "<p>Try again later.</p>", 503)
            return fail("access_denied", "The user or the EHR denied the request")
        if len(params) != len(items):
            return fail("invalid_request", "A parameter was repeated")
        if params.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be 'code'")
        if not state:
            return fail("invalid_request", "state is required", with_state=False)
        scopes = params.get("scope", "").split()
        if not scopes:
            return fail("invalid_scope", "scope is required")
        if params.get("code_challenge_method") != "S256":
            return fail("invalid_request", "PKCE with code_challenge_method=S256 is required")
        challenge = params.get("code_challenge", "")
        if not _PKCE_CHALLENGE_RE.match(challenge):
            return fail("invalid_request", "code_challenge is missing or malformed")
        if params.get("aud") != profile.fhir_base:
            return fail(
                "invalid_request", f"aud must be this EHR's FHIR base URL ({profile.fhir_base})"
            )
        nonce = params.get("nonce")
        launch = params.get("launch")
        if launch:
            if "launch" not in scopes:
                return fail("invalid_scope", "an EHR launch requires the 'launch' scope")
            with self._lock:
                ctx = self._launches.get(launch)
            if ctx is None or ctx.profile != profile.name or ctx.expires_at <= self.clock():
                return fail("invalid_request", "The launch token is unknown or expired")
            if ctx.deny:
                return fail("access_denied", "The user denied the request")
            code = self._issue_code(
                profile=profile,
                client_id=client_id,
                redirect_uri=redirect_uri,
                code_challenge=challenge,
                scopes=scopes,
                nonce=nonce,
                fhir_user=ctx.fhir_user,
                launch=ctx,
            )
            return self._redirect_code(profile, redirect_uri, code, state)
        if "launch" in scopes:
            return fail("invalid_request", "scope 'launch' requires a launch parameter")
        req = secrets.token_urlsafe(24)
        with self._lock:
            now = self.clock()
            for key in [k for k, v in self._signins.items() if v.expires_at < now]:
                del self._signins[key]
            self._signins[req] = _PendingSignin(
                profile=profile.name,
                client_id=client_id,
                redirect_uri=redirect_uri,
                state=state,
                code_challenge=challenge,
                scopes=scopes,
                nonce=nonce,
                expires_at=now + SIGNIN_TTL,
            )
        return self._signin_page(profile, req)

    @staticmethod
    def _signin_users() -> list[seed.SeedPractitioner]:
        analyst = seed.PRACTITIONERS[seed.ANALYST_ID]
        clinicians = [seed.PRACTITIONERS[p] for p in seed.CLINICIAN_IDS]
        return [analyst, *clinicians]

    def _signin_page(self, profile: EhrProfile, req: str) -> HTMLResponse:
        rows = []
        for user in self._signin_users():
            href = f"{profile.signin_endpoint}?{urlencode({'req': req, 'user': user.id})}"
            role = "EHR analyst" if user.role == "analyst" else "clinician"
            rows.append(
                f'<li><a class="user" data-user-id="{html.escape(user.id)}" '
                f'href="{html.escape(href)}">Sign in as {html.escape(user.name)}</a> '
                f"({role})</li>"
            )
        deny = f"{profile.signin_endpoint}?{urlencode({'req': req, 'deny': '1'})}"
        body = (
            f"<p>An application asks to sign you in to the EHR ({html.escape(profile.label)}). "
            "Choose a user:</p>"
            f"<ul class=users>{''.join(rows)}</ul>"
            f'<p><a class="deny" href="{html.escape(deny)}">Deny</a></p>'
        )
        return _page("Sign in to the Sandbox EHR", body)

    async def _signin(self, request: Request, profile: EhrProfile) -> Response:
        req = request.query_params.get("req", "")
        with self._lock:
            pending = self._signins.get(req)
            if pending is not None and pending.profile == profile.name:
                del self._signins[req]
            else:
                pending = None
        if pending is None or pending.expires_at <= self.clock():
            return self._error_page(
                "Sign-in expired", "This sign-in request is unknown, used or expired."
            )
        if request.query_params.get("deny"):
            return self._redirect_error(
                profile,
                pending.redirect_uri,
                pending.state,
                "access_denied",
                "The user denied the request",
            )
        user_id = request.query_params.get("user", "")
        if user_id not in {u.id for u in self._signin_users()}:
            return self._error_page("Unknown user", "No such EHR user.")
        code = self._issue_code(
            profile=profile,
            client_id=pending.client_id,
            redirect_uri=pending.redirect_uri,
            code_challenge=pending.code_challenge,
            scopes=pending.scopes,
            nonce=pending.nonce,
            fhir_user=f"Practitioner/{user_id}",
            launch=None,
        )
        return self._redirect_code(profile, pending.redirect_uri, code, pending.state)

    # --- token ----------------------------------------------------------------------------------

    @staticmethod
    def _token_error(err: _OAuthError) -> Response:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if err.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="sandbox-ehr"'
        return JSONResponse(
            {"error": err.error, "error_description": err.description},
            status_code=err.status,
            headers=headers,
        )

    async def _token(self, request: Request, profile: EhrProfile) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = (await request.body()).decode("utf-8", errors="replace")
        parsed = parse_qs(body, keep_blank_values=True)
        form = {k: v[0] for k, v in parsed.items()}
        grant_type = form.get("grant_type", "")
        fault = await self._take_fault(
            "backend-token" if grant_type == "client_credentials" else "token"
        )
        if fault:
            error = "temporarily_unavailable" if fault.status == 503 else "server_error"
            return JSONResponse(
                {"error": error, "error_description": "injected fault"},
                status_code=fault.status,
                headers={"Cache-Control": "no-store"},
            )
        try:
            if content_type != "application/x-www-form-urlencoded":
                raise _OAuthError(
                    "invalid_request", "the body must be application/x-www-form-urlencoded"
                )
            if any(len(v) > 1 for v in parsed.values()):
                raise _OAuthError("invalid_request", "a parameter was repeated")
            if grant_type == "authorization_code":
                return await self._token_code(form, profile)
            if grant_type == "client_credentials":
                return await self._token_backend(form, profile)
            raise _OAuthError("unsupported_grant_type", f"grant_type {grant_type!r}")
        except _OAuthError as err:
            return self._token_error(err)

    async def _authenticate_client(
        self, form: dict[str, str], profile: EhrProfile, *, require_assertion: bool
    ) -> str:
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if assertion_type or assertion:
            if assertion_type != JWT_BEARER:
                raise _OAuthError(
                    "invalid_client", f"client_assertion_type must be {JWT_BEARER}", 401
                )
            if not assertion:
                raise _OAuthError("invalid_client", "client_assertion is missing", 401)
            return await self._verify_assertion(
                assertion, form.get("client_id"), audience=profile.token_endpoint
            )
        if require_assertion:
            raise _OAuthError(
                "invalid_client", "client authentication with private_key_jwt is required", 401
            )
        client_id = form.get("client_id")
        if client_id != self.smart_client_id:
            raise _OAuthError("invalid_client", f"unknown client_id {client_id!r}", 401)
        return client_id

    async def _client_jwks(self, *, refresh: bool) -> dict[str, Any]:
        assert self.connector_jwks_url is not None
        with self._lock:
            cached = self._jwks_cache
        if cached and not refresh and self.clock() - cached[0] < JWKS_CACHE_TTL:
            return cached[1]
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(self.connector_jwks_url)
                response.raise_for_status()
                jwks = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise _OAuthError(
                "invalid_client", f"could not fetch the client's JWKS: {exc}", 401
            ) from exc
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise _OAuthError("invalid_client", "the client's JWKS is not a JWK Set", 401)
        with self._lock:
            self._jwks_cache = (self.clock(), jwks)
        return jwks

    async def _assertion_keys(self, kid: str | None, alg: str) -> list[Any]:
        kty = "RSA" if alg.startswith("RS") else "EC"
        for refresh in (False, True):
            jwks = await self._client_jwks(refresh=refresh)
            keys = []
            for jwk in jwks["keys"]:
                if not isinstance(jwk, dict) or jwk.get("kty") != kty:
                    continue
                if kid is not None and jwk.get("kid") != kid:
                    continue
                if jwk.get("alg") not in (None, alg) or jwk.get("use") not in (None, "sig"):
                    continue
                try:
                    keys.append(jwt.PyJWK(jwk, algorithm=alg).key)
                except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                    continue
            if keys:
                return keys
        raise _OAuthError("invalid_client", "no matching key in the client's JWKS", 401)

    async def _verify_assertion(
        self, assertion: str, client_id_param: str | None, *, audience: str
    ) -> str:
        def bad(why: str) -> _OAuthError:
            return _OAuthError("invalid_client", f"client_assertion rejected: {why}", 401)

        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise bad("not a JWT") from exc
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise bad(f"alg must be one of {', '.join(ASSERTION_ALGS)}")
        iss, sub = unverified.get("iss"), unverified.get("sub")
        if iss != self.smart_client_id or sub != iss:
            raise bad("iss and sub must both be the registered client_id")
        if client_id_param is not None and client_id_param != iss:
            raise bad("client_id does not match the assertion's iss")
        if self.connector_jwks_url is None:
            raise bad("no JWKS URL is registered for this client")
        kid = header.get("kid")
        claims: dict[str, Any] | None = None
        for key in await self._assertion_keys(kid if isinstance(kid, str) else None, alg):
            try:
                claims = jwt.decode(
                    assertion,
                    key,
                    algorithms=[alg],
                    audience=audience,
                    options={
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                        "require": ["iss", "sub", "aud", "exp", "jti"],
                    },
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError as exc:
                raise bad(f"aud must be the token endpoint {audience}") from exc
            except jwt.PyJWTError as exc:
                raise bad(str(exc)) from exc
        if claims is None:
            raise bad("signature verification failed")
        now = self.clock()
        exp = claims["exp"]
        if not isinstance(exp, int | float):
            raise bad("exp must be a number")
        if exp <= now - CLOCK_SKEW:
            raise bad("expired")
        if exp > now + ASSERTION_MAX_LIFETIME + CLOCK_SKEW:
            raise bad("exp must be at most 5 minutes in the future")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > now + CLOCK_SKEW:
            raise bad("not yet valid (nbf)")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise bad("jti must be a non-empty string")
        with self._lock:
            for key_ in [k for k, v in self._jtis.items() if v < now - CLOCK_SKEW]:
                del self._jtis[key_]
            if jti in self._jtis:
                raise bad("jti was already used (replay)")
            self._jtis[jti] = float(exp)
        return str(iss)

    def _new_access_token(self, info: _AccessToken) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            for key in [k for k, v in self._tokens.items() if v.expires_at + 3600 < now]:
                del self._tokens[key]
            self._tokens[token] = info
        return token

    @staticmethod
    def _sub(profile: EhrProfile, fhir_user: str) -> str:
        realm = "sandbox" if profile.name == "default" else f"sandbox-{profile.name}"
        return "ehr-user-" + hashlib.sha256(f"{realm}:{fhir_user}".encode()).hexdigest()[:24]

    def _record_token_request(self, profile: EhrProfile, grant_type: str, auth: str) -> None:
        with self._lock:
            for target in (self.token_requests, profile.token_requests):
                target.append({"grant_type": grant_type, "auth": auth})

    def _id_token(self, profile: EhrProfile, grant: _AuthCode, client_id: str, now: float) -> str:
        """OpenID Connect id_token: ``iss`` = the issuer, ``aud`` = the client, ``exp``, ``iat``,
        the request's ``nonce``; an absolute ``fhirUser`` when ``fhirUser``/``profile`` was
        asked for."""
        claims: dict[str, Any] = {
            "iss": profile.issuer,
            "aud": client_id,
            "sub": self._sub(profile, grant.fhir_user),
            "iat": int(now),
            "auth_time": int(now),
            "exp": int(now) + USER_TOKEN_TTL,
        }
        if "fhirUser" in grant.scopes or "profile" in grant.scopes:
            claims["fhirUser"] = f"{profile.fhir_base}/{grant.fhir_user}"
        if grant.nonce:
            claims["nonce"] = grant.nonce
        return profile._sign(claims)

    async def _token_code(self, form: dict[str, str], profile: EhrProfile) -> Response:
        client_id = await self._authenticate_client(
            form, profile, require_assertion=self.require_client_assertion
        )
        method = "private_key_jwt" if form.get("client_assertion") else "none"
        code = form.get("code")
        if not code:
            raise _OAuthError("invalid_request", "code is required")
        now = self.clock()
        with self._lock:
            grant = self._codes.get(code)
            if grant is None or grant.profile != profile.name:  # another EHR's code
                raise _OAuthError("invalid_grant", "unknown authorization code")
            if grant.used:
                for token in grant.access_tokens:
                    if token in self._tokens:
                        self._tokens[token].revoked = True
                raise _OAuthError(
                    "invalid_grant", "authorization code already used; its tokens are revoked"
                )
            grant.used = True
        if grant.expires_at <= now:
            raise _OAuthError("invalid_grant", "authorization code expired")
        if grant.client_id != client_id:
            raise _OAuthError("invalid_grant", "code was issued to another client")
        if form.get("redirect_uri") != grant.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri does not match the authorize request")
        verifier = form.get("code_verifier")
        if not verifier:
            raise _OAuthError("invalid_grant", "code_verifier is required (PKCE)")
        if not _PKCE_VERIFIER_RE.match(verifier) or not secrets.compare_digest(
            _b64url_sha256(verifier), grant.code_challenge
        ):
            raise _OAuthError("invalid_grant", "PKCE verification failed")

        ctx = grant.launch
        access = self._new_access_token(
            _AccessToken(
                profile=profile.name,
                kind="user",
                client_id=client_id,
                scopes=frozenset(grant.scopes),
                expires_at=now + USER_TOKEN_TTL,
                patient_id=ctx.patient_id if ctx else None,
            )
        )
        with self._lock:
            grant.access_tokens.append(access)
        self._record_token_request(profile, "authorization_code", method)
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": USER_TOKEN_TTL,
            "scope": " ".join(grant.scopes),
        }
        if "openid" in grant.scopes:
            body["id_token"] = self._id_token(profile, grant, client_id, now)
        if ctx is not None:
            # Launch context arrives in the token response.
            body["patient"] = ctx.patient_id
            if ctx.encounter_id:
                body["encounter"] = ctx.encounter_id
            fhir_context = profile._fhir_context(ctx)
            if fhir_context:
                body["fhirContext"] = fhir_context
            body["need_patient_banner"] = False
            body["smart_style_url"] = f"{self.base_url}/smart-style.json"
        else:
            body["need_patient_banner"] = True
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def _token_backend(self, form: dict[str, str], profile: EhrProfile) -> Response:
        client_id = await self._authenticate_client(form, profile, require_assertion=True)
        scopes = form.get("scope", "").split()
        if not scopes:
            raise _OAuthError("invalid_scope", "scope is required")
        for scope in scopes:
            match = _SCOPE_RE.match(scope)
            if not match or match.group(1) != "system" or not match.group(3):
                raise _OAuthError(
                    "invalid_scope", f"{scope!r}: backend services take system/ scopes only"
                )
        access = self._new_access_token(
            _AccessToken(
                profile=profile.name,
                kind="system",
                client_id=client_id,
                scopes=frozenset(scopes),
                expires_at=self.clock() + SYSTEM_TOKEN_TTL,
            )
        )
        self._record_token_request(profile, "client_credentials", "private_key_jwt")
        return JSONResponse(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": SYSTEM_TOKEN_TTL,
                "scope": " ".join(scopes),
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    # --- FHIR -----------------------------------------------------------------------------------

    def _lookup(self, profile: EhrProfile, rtype: str, rid: str) -> dict[str, Any] | None:
        if rtype == "Patient" and rid in seed.PATIENTS:
            return seed.patient_resource(seed.PATIENTS[rid])
        if rtype == "Practitioner" and rid in seed.PRACTITIONERS:
            return seed.practitioner_resource(seed.PRACTITIONERS[rid])
        if rtype == "Appointment" and rid in seed.APPOINTMENTS:
            return seed.appointment_resource(seed.APPOINTMENTS[rid])
        if rtype == "Encounter" and rid in seed.ENCOUNTERS:
            resource = seed.encounter_resource(rid)
            if profile.spec.context == "encounter":
                resource.pop("appointment", None)  # no appointment anywhere in its context
            return resource
        if rtype == "AuditEvent":
            with self._lock:
                stored = self._audit_by_id.get(rid)
            if stored is None or stored[0] != profile.name:
                return None
            return dict(stored[1])
        return None

    @staticmethod
    def _in_patient_compartment(resource: dict[str, Any], patient_id: str | None) -> bool:
        if patient_id is None:
            return False
        rtype = resource["resourceType"]
        ref = f"Patient/{patient_id}"
        if rtype == "Patient":
            return bool(resource["id"] == patient_id)
        if rtype == "Practitioner":
            return True
        if rtype == "Appointment":
            return any(
                p.get("actor", {}).get("reference") == ref for p in resource.get("participant", [])
            )
        if rtype == "Encounter":
            return bool(resource.get("subject", {}).get("reference") == ref)
        return False

    async def _fhir_read(self, request: Request, profile: EhrProfile) -> Response:
        fault = await self._take_fault("fhir")
        if fault:
            return _outcome(fault.status, "transient", "injected fault")
        info, denied = self._bearer(request, profile)
        if denied or info is None:
            return denied or _outcome(401, "login", "unauthorized")
        rtype, rid = request.path_params["rtype"], request.path_params["rid"]
        if rtype not in READABLE_TYPES:
            return _outcome(404, "not-supported", f"Resource type {rtype} is not supported")
        contexts = self._allowed_contexts(info.scopes, rtype, "read")
        if not contexts:
            return _outcome(403, "forbidden", f"The token's scopes do not allow reading {rtype}")
        if rtype == "AuditEvent" and info.kind != "system":
            return _outcome(403, "forbidden", "AuditEvent reads need a system token")
        resource = self._lookup(profile, rtype, rid)
        if resource is None:
            return _outcome(404, "not-found", f"{rtype}/{rid} is not known")
        if contexts == {"patient"} and not self._in_patient_compartment(resource, info.patient_id):
            return _outcome(403, "forbidden", "Outside the launch patient's compartment")
        return Response(json.dumps(resource), media_type=FHIR_JSON)

    async def _post_audit_event(self, request: Request, profile: EhrProfile) -> Response:
        fault = await self._take_fault("auditevent")
        if fault:
            return _outcome(fault.status, "transient", "injected fault")
        info, denied = self._bearer(request, profile)
        if denied or info is None:
            return denied or _outcome(401, "login", "unauthorized")
        if not self._allowed_contexts(info.scopes, "AuditEvent", "create"):
            return _outcome(403, "forbidden", "The token's scopes do not allow creating AuditEvent")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/fhir+json", "application/json"):
            return _outcome(415, "not-supported", "Content-Type must be application/fhir+json")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _outcome(400, "structure", "The body is not JSON")
        if not isinstance(body, dict) or body.get("resourceType") != "AuditEvent":
            return _outcome(400, "structure", "The body must be an AuditEvent resource")
        missing = [k for k in ("type", "recorded", "agent", "source") if not body.get(k)]
        if missing:
            return _outcome(400, "required", f"AuditEvent is missing: {', '.join(missing)}")
        from fhir.resources.R4B.auditevent import AuditEvent  # heavy; only this path needs it

        try:
            AuditEvent.model_validate(body)
        except ValueError as exc:
            return _outcome(400, "invalid", f"Invalid AuditEvent: {exc}")
        condition = request.headers.get("if-none-exist")
        wanted: tuple[str, str] | None = None
        if condition is not None and not self.ignore_if_none_exist:
            wanted = _identifier_search(condition)
            if wanted is None:
                return _outcome(
                    400,
                    "not-supported",
                    "If-None-Exist supports entity:identifier=system|value only",
                )
        new_id = uuid.uuid4().hex
        stored = dict(body)
        updated = datetime.fromtimestamp(self.clock(), UTC).isoformat().replace("+00:00", "Z")
        created = {**body, "id": new_id, "meta": {"versionId": "1", "lastUpdated": updated}}
        with self._lock:  # the search and the insert are one step: no duplicate under races
            if wanted is not None:
                matches = self._matching_audit_events(profile, *wanted)
                if len(matches) > 1:
                    return _outcome(412, "duplicate", "If-None-Exist matches several resources")
                if matches:
                    return Response(json.dumps(matches[0]), status_code=200, media_type=FHIR_JSON)
            _append_bounded(self.audit_events, stored, MAX_AUDIT_EVENTS)
            _append_bounded(profile.audit_events, stored, MAX_AUDIT_EVENTS)
            self._audit_by_id[new_id] = (profile.name, created)
            for index in self._identifier_keys(profile.name, created):
                self._audit_by_identifier.setdefault(index, []).append(new_id)
            while len(self._audit_by_id) > MAX_AUDIT_EVENTS:
                self._forget_oldest_audit_event()
        return Response(
            json.dumps(created),
            status_code=201,
            media_type=FHIR_JSON,
            headers={"Location": f"{profile.fhir_base}/AuditEvent/{new_id}/_history/1"},
        )

    @staticmethod
    def _identifier_keys(profile: str, resource: dict[str, Any]) -> list[tuple[str, str, str]]:
        keys = []
        for entity in resource.get("entity", []):
            identifier = entity.get("what", {}).get("identifier", {})
            if isinstance(identifier, dict) and identifier.get("system"):
                keys.append((profile, identifier["system"], str(identifier.get("value"))))
        return keys

    def _forget_oldest_audit_event(self) -> None:
        """Drops the oldest stored AuditEvent and its index entries. Called with the lock held."""
        oldest = next(iter(self._audit_by_id))
        profile, resource = self._audit_by_id.pop(oldest)
        for index in self._identifier_keys(profile, resource):
            ids = self._audit_by_identifier.get(index, [])
            if oldest in ids:
                ids.remove(oldest)
            if not ids:
                self._audit_by_identifier.pop(index, None)

    def _matching_audit_events(
        self, profile: EhrProfile, system: str, value: str
    ) -> list[dict[str, Any]]:
        """This profile's stored AuditEvents with an entity identified by ``system|value``.
        Called with the lock held."""
        ids = self._audit_by_identifier.get((profile.name, system, value), [])
        return [self._audit_by_id[i][1] for i in ids]

    async def _search_audit_events(self, request: Request, profile: EhrProfile) -> Response:
        fault = await self._take_fault("fhir")
        if fault:
            return _outcome(fault.status, "transient", "injected fault")
        info, denied = self._bearer(request, profile)
        if denied or info is None:
            return denied or _outcome(401, "login", "unauthorized")
        if info.kind != "system" or not self._allowed_contexts(info.scopes, "AuditEvent", "read"):
            return _outcome(403, "forbidden", "Searching AuditEvent needs a system read scope")
        try:
            search = _AuditSearch.parse(request.query_params.multi_items(), profile.fhir_base)
        except ValueError as exc:
            return _outcome(400, "not-supported", str(exc))
        with self._lock:
            stored = [r for name, r in self._audit_by_id.values() if name == profile.name]
        matches = search.run(stored)
        end = search.offset + search.count
        links = [{"relation": "self", "url": str(request.url)}]
        if search.count and end < len(matches):  # as a FHIR server pages: follow "next"
            links.append(
                {"relation": "next", "url": str(request.url.include_query_params(_offset=end))}
            )
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": links,
            "entry": [
                {
                    "fullUrl": f"{profile.fhir_base}/AuditEvent/{m['id']}",
                    "resource": m,
                    "search": {"mode": "match"},
                }
                for m in matches[search.offset : end]
            ],
        }
        return Response(json.dumps(bundle), media_type=FHIR_JSON)

    # --- Epic -----------------------------------------------------------------------------------

    async def _epic_status(self, request: Request, profile: EhrProfile) -> Response:
        fault = await self._take_fault("epic")
        if fault:
            return JSONResponse({"Message": "injected fault"}, status_code=fault.status)
        info, denied = self._bearer(request, profile)
        if denied or info is None:
            return denied or JSONResponse({"Message": "unauthorized"}, status_code=401)
        if info.kind != "system":
            return JSONResponse(
                {"Message": "a backend services (system) token is required"}, status_code=403
            )
        params: dict[str, Any] = dict(request.query_params)
        raw = await request.body()
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                return JSONResponse({"Message": "The body is not JSON"}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"Message": "The body must be a JSON object"}, status_code=400)
            params.update(body)
        present = {k.lower() for k, v in params.items() if v not in (None, "")}
        missing = [p for p in EPIC_REQUIRED_PARAMS if p.lower() not in present]
        if missing:
            return JSONResponse(
                {"Message": f"Missing parameters: {', '.join(missing)}"}, status_code=400
            )
        with self._lock:
            _append_bounded(self.epic_status_calls, params, MAX_EPIC_CALLS)
            _append_bounded(profile.epic_status_calls, params, MAX_EPIC_CALLS)
            self._epic_log.append((self.clock(), profile.name, dict(params)))
        return JSONResponse({})

    # --- the human page ---------------------------------------------------------------------------

    @staticmethod
    def _config_param(profile: EhrProfile) -> str:
        return "config" if profile.name == "default" else f"config_{profile.name}"

    def writebacks(self, profile: EhrProfile) -> dict[str, list[dict[str, str]]]:
        """Per appointment id, what the connector wrote back to this profile (AuditEvents and
        Epic connection-status calls), oldest first, at most ``WRITEBACKS_SHOWN`` each:
        ``{"time", "kind", "text"}``."""
        with self._lock:
            events = [r for name, r in self._audit_by_id.values() if name == profile.name]
            calls = [(t, params) for t, name, params in self._epic_log if name == profile.name]
        # reference -> appointment ids, built once: the page polls this every few seconds
        by_reference: dict[str, list[str]] = {}
        for appt in profile.appointments():
            for ref in (f"Appointment/{appt.id}", f"Encounter/{appt.encounter_id}"):
                by_reference.setdefault(ref, []).append(appt.id)
        found: dict[str, list[tuple[datetime, dict[str, str]]]] = {}
        for event in events:
            refs = {str(e.get("what", {}).get("reference")) for e in event.get("entity", [])}
            hits = {appt_id for ref in refs for appt_id in by_reference.get(ref, ())}
            if hits:
                at = _recorded(event)
                line = _audit_line(event, at)
                for appt_id in hits:
                    found.setdefault(appt_id, []).append((at, line))
        for received, params in calls:
            at = datetime.fromtimestamp(received, UTC)
            for appt_id in _epic_call_appointments(params):
                found.setdefault(appt_id, []).append((at, _epic_line(params, at)))
        return {
            appt: [line for _, line in sorted(lines, key=lambda x: x[0])][-WRITEBACKS_SHOWN:]
            for appt, lines in found.items()
        }

    def _profile_section(self, profile: EhrProfile, config_id: str | None) -> str:
        writebacks = self.writebacks(profile)
        rows = []
        for appt in profile.appointments():
            patient = seed.PATIENTS[appt.patient_id]
            clinician = seed.PRACTITIONERS[appt.practitioner_id]
            kind = html.escape(appt.visit_type)
            if appt.conference_id and profile.spec.context != "encounter":
                kind += ' <span class="badge">group visit</span>'
            if config_id:
                buttons = []
                for role, label in _LAUNCH_BUTTONS[profile.name]:
                    url = profile.launch_url(config_id, appointment_id=appt.id, user=role)
                    buttons.append(
                        f'<a class="launch" data-role="{role}" '
                        f'data-appointment="{html.escape(appt.id)}" '
                        f'href="{html.escape(url)}" data-profile="{profile.name}">'
                        f"{html.escape(label)}</a>"
                    )
                actions = "<br>".join(buttons)
            else:
                actions = "<em>set a config id above</em>"
            rows.append(
                f'<tr data-appointment="{html.escape(appt.id)}">'
                f"<td>{appt.start():%H:%M}-{appt.end():%H:%M} UTC</td>"
                f"<td>{html.escape(patient.name)}</td>"
                f"<td>{html.escape(clinician.name)}</td><td>{kind}</td><td>{actions}</td>"
                f"<td>{_writeback_list(profile, appt.id, writebacks.get(appt.id, []))}</td></tr>"
            )
        heading_id = f"profile-{profile.name}"
        return (
            f'<section class="profile" data-profile="{profile.name}" '
            f'aria-labelledby="{heading_id}">'
            f'<h2 id="{heading_id}">{html.escape(profile.label)}</h2>'
            f"<p>FHIR base: <code>{html.escape(profile.fhir_base)}</code><br>"
            f"OAuth issuer: <code>{html.escape(profile.issuer)}</code><br>"
            f"Connector config: <code>{html.escape(config_id or '(none)')}</code> "
            f"(<code>ehrVendor</code> {html.escape(profile.vendor)})</p>"
            f'<table class="appointments" data-profile="{profile.name}"><thead><tr>'
            '<th scope="col">Time</th><th scope="col">Patient</th><th scope="col">Clinician</th>'
            '<th scope="col">Type</th><th scope="col">Virtual visit</th>'
            '<th scope="col">Write-backs received (AuditEvent, Epic status)</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            f"{self._group_section(profile, config_id)}</section>"
        )

    def _group_section(self, profile: EhrProfile, config_id: str | None) -> str:
        """The group visit as its people launch it: each clinician, the interpreter and each
        patient with their own button (one conference id, so one meeting)."""
        if profile.spec.context == "encounter":
            return ""  # Oracle Health's launch context names the encounter only
        rows = []
        for person in seed.group_visit_people():
            if config_id:
                url = profile.launch_url(
                    config_id,
                    appointment_id=person.appointment_id,
                    user=person.user,
                    practitioner_id=person.practitioner_id,
                )
                action = (
                    f'<a class="group-launch" data-role="{person.user}" '
                    f'data-person="{html.escape(person.person_id)}" '
                    f'data-appointment="{html.escape(person.appointment_id)}" '
                    f'data-profile="{profile.name}" href="{html.escape(url)}">'
                    f"Start virtual visit as {html.escape(person.name)}</a>"
                )
            else:
                action = "<em>set a config id above</em>"
            rows.append(
                f'<tr data-person="{html.escape(person.person_id)}">'
                f"<td>{html.escape(person.name)}</td><td>{html.escape(person.part)}</td>"
                f"<td><code>{html.escape(person.appointment_id)}</code></td><td>{action}</td></tr>"
            )
        heading_id = f"group-{profile.name}"
        session = (
            " The launch URL carries it as <code>sessionId</code>, as Epic's group-visit "
            "integration record does."
            if profile.spec.context == "epic"
            else " The launch context carries it (fhirContext identifier)."
        )
        return (
            f'<h3 id="{heading_id}">Group visit: conference '
            f"<code>{html.escape(seed.CONFERENCE_ID)}</code></h3>"
            "<p>Two clinicians, an interpreter and two patients; whoever launches first opens "
            f"the meeting, everyone else reaches the same one.{session}</p>"
            f'<table class="group-visit" data-profile="{profile.name}" '
            f'aria-labelledby="{heading_id}"><thead><tr>'
            '<th scope="col">Person</th><th scope="col">Part in the visit</th>'
            '<th scope="col">Appointment</th><th scope="col">Virtual visit</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    async def _writebacks_json(self, request: Request) -> Response:
        return JSONResponse(
            {p.name: self.writebacks(p) for p in self._profiles.values()},
            headers={"Cache-Control": "no-store"},
        )

    async def _home(self, request: Request) -> Response:
        configs = {
            p.name: request.query_params.get(self._config_param(p)) or p.config_id
            for p in self._profiles.values()
        }
        fields = "".join(
            f"<label>{html.escape(p.label)} config id "
            f'<input name="{self._config_param(p)}" value="{html.escape(configs[p.name] or "")}">'
            "</label>"
            for p in self._profiles.values()
        )
        form = f'<form method="get" action="/">{fields}<button type=submit>Use</button></form>'
        sections = "".join(
            self._profile_section(p, configs[p.name]) for p in self._profiles.values()
        )
        note = (
            '<p class="note">Write-backs show up as the connector sends them (this page asks '
            'every few seconds; <a href="/writebacks">as JSON</a>). Search them like the '
            "connector does: <code>GET {FHIR base}/AuditEvent?entity=Appointment/{id}"
            "&amp;_sort=-date</code> with a backend-services token.</p>"
            "<noscript><p>Reload the page to see new write-backs.</p></noscript>"
        )
        return _page(
            "Sandbox EHR — today's appointments", form + note + sections + _WRITEBACK_SCRIPT
        )


def _person_name(reference: str | None) -> str:
    """The seed person a reference names (the EHR knows its people), or a neutral label."""
    kind, _, rid = (reference or "").partition("/")
    if kind == "Practitioner" and rid in seed.PRACTITIONERS:
        return seed.PRACTITIONERS[rid].name
    if kind == "Patient" and rid in seed.PATIENTS:
        return seed.PATIENTS[rid].name
    return "a participant"


def _audit_line(event: dict[str, Any], at: datetime) -> dict[str, str]:
    agent = (event.get("agent") or [{}])[0]
    who = _person_name(agent.get("who", {}).get("reference"))
    codes = {str(c.get("code")) for c in event.get("subtype") or [] if isinstance(c, dict)}
    what = "connected" if "110122" in codes else "disconnected" if "110123" in codes else "event"
    outcome = str(event.get("outcome", "?"))
    result = "success" if outcome == "0" else f"outcome {outcome}"
    return {
        "time": f"{at:%H:%M:%S}",
        "kind": "auditevent",
        "text": f"AuditEvent: {who} {what} ({event.get('outcomeDesc', '')}; {result})",
    }


def _epic_call_appointments(params: dict[str, Any]) -> list[str]:
    """The appointments an Epic connection-status call is about: its ConferenceID is the
    conference id, the appointment or the encounter; ExternalID narrows a group visit to the
    patient's own appointment."""
    lowered = {k.lower(): str(v) for k, v in params.items()}
    conference, external = lowered.get("conferenceid", ""), lowered.get("externalid", "")
    found = []
    for appt in seed.APPOINTMENTS.values():
        if conference not in (appt.id, appt.encounter_id, appt.conference_id):
            continue
        if external in seed.PATIENTS and external != appt.patient_id:
            continue
        found.append(appt.id)
    return found


def _epic_line(params: dict[str, Any], at: datetime) -> dict[str, str]:
    lowered = {k.lower(): str(v) for k, v in params.items()}
    external = lowered.get("externalid", "")
    who = (
        _person_name(f"Patient/{external}")
        if external in seed.PATIENTS
        else _person_name(f"Practitioner/{external}")
    )
    return {
        "time": f"{at:%H:%M:%S}",
        "kind": "epic",
        "text": f"Epic SetExternalConnectionStatus: {lowered.get('connectionstatus', '?')} ({who})",
    }


def _writeback_list(profile: EhrProfile, appointment_id: str, lines: list[dict[str, str]]) -> str:
    items = "".join(
        f'<li data-kind="{html.escape(line["kind"])}"><time>{html.escape(line["time"])}</time> '
        f"{html.escape(line['text'])}</li>"
        for line in lines
    )
    return (
        f'<ul class="writebacks" data-profile="{profile.name}" '
        f'data-appointment="{html.escape(appointment_id)}" aria-live="polite">{items}</ul>'
    )


# Asks /writebacks every 3 s and refills each appointment's list (text only, no markup).
_WRITEBACK_SCRIPT = """<script>
(function(){
  function fill(data){
    document.querySelectorAll("ul.writebacks").forEach(function(ul){
      var lines=((data[ul.dataset.profile]||{})[ul.dataset.appointment])||[];
      var shown=JSON.stringify(lines);
      if(ul.dataset.shown===shown){return;}
      ul.dataset.shown=shown;ul.textContent="";
      lines.forEach(function(line){
        var li=document.createElement("li"),t=document.createElement("time");
        li.dataset.kind=line.kind;t.textContent=line.time;
        li.appendChild(t);li.appendChild(document.createTextNode(" "+line.text));
        ul.appendChild(li);
      });
    });
  }
  function ask(){
    fetch("/writebacks",{cache:"no-store"}).then(function(r){return r.ok?r.json():null;})
      .then(function(d){if(d){fill(d);}}).catch(function(){})
      .then(function(){setTimeout(ask,3000);});
  }
  setTimeout(ask,3000);
})();
</script>"""
