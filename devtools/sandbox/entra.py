"""Microsoft Entra ID stand-in (HTTPS): OIDC discovery, JWKS, authorize (account picker), token.

The layout is Entra's, everything derived from the authority host (``ENTRA_AUTHORITY_HOST``)::

    GET  /{tenant}/v2.0/.well-known/openid-configuration   issuer {host}/{tid}/v2.0
    GET  /{tenant}/.well-known/openid-configuration        (v1) issuer https://sts.windows.net/{tid}/
    GET  /{tenant}/discovery/v2.0/keys   /{tenant}/discovery/keys
    GET  /{tenant}/oauth2/v2.0/authorize         -> one-click account picker (HTML)
    GET  /{tenant}/oauth2/v2.0/authorize/select  -> issues the code, 302 to redirect_uri
    POST /{tenant}/oauth2/v2.0/token             authorization_code (PKCE), refresh_token,
                                                 client_credentials
    GET  /{tenant}/oauth2/v2.0/logout

``{tenant}`` is a tenant id, one of its domains, ``common`` or ``organizations`` (for those two the
issuer is the template ``{host}/{tenantid}/v2.0``, as Entra publishes it). msal's
``ConfidentialClientApplication(client_id, client_credential=secret, authority=f"{host}/{tid}",
instance_discovery=False)`` runs unchanged against it.

Token layouts (all RS256, ``kid``/``x5t`` of a key in the JWKS; one key set for every tenant, as
Entra does):

* id_token (v2): ``aud``=client id, ``iss``={host}/{tid}/v2.0, ``oid``, ``tid``, ``sub`` (pairwise),
  ``preferred_username``, ``name``, ``nonce`` (verbatim from the authorize request), ``ver`` 2.0.
* access token for the connector's API (scope ``api://{client_id}/...``; also what
  :meth:`SandboxEntra.mint_access_token` makes): v2, ``aud`` api://{client_id}, ``iss``
  {host}/{tid}/v2.0, ``oid``, ``tid``, ``preferred_username``, ``name``, ``scp``, ``roles``
  (app roles such as ``Connector.Admin``; omitted when empty), ``azp``.
* Graph app-only token (client credentials, scope ``https://graph.microsoft.com/.default``):
  v1 like real Graph tokens, ``aud`` https://graph.microsoft.com, ``iss``
  https://sts.windows.net/{tid}/, ``appid``=client id, ``roles`` (application permissions),
  ``tid``, ``oid``/``sub`` (the app's service principal in that tenant), ``idtyp`` app.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import jwt
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devtools.sandbox._jose import SigningKey, b64url, hs256_jwt, unsigned_jwt

__all__ = [
    "ADMIN_ROLE",
    "AUDITOR_ROLE",
    "CONTOSO_TID",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "FABRIKAM_TID",
    "FORGED_KINDS",
    "GRAPH_APP_ID",
    "GRAPH_AUDIENCE",
    "GRAPH_CHANGE_TRACKING_APP_ID",
    "PORTAL_PERSONAS",
    "SENSITIVE_VALUES",
    "TENANTS",
    "USERS",
    "EntraTenant",
    "EntraUser",
    "SandboxEntra",
]

DEFAULT_CLIENT_ID = "5d3c9a1e-7b24-4f0c-9a6e-2c8b1f4d7e90"
DEFAULT_CLIENT_SECRET = "sandbox-dev-secret~not-for-production~7Qm2"
ADMIN_ROLE = "Connector.Admin"
AUDITOR_ROLE = "Connector.Auditor"  # read-only: configs, their history, usage reports
GRAPH_AUDIENCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_CHANGE_TRACKING_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"
DEFAULT_GRAPH_ROLES = ("OnlineMeetings.ReadWrite.All", "OnlineMeetings.Read.All")
FORGED_KINDS = (
    "unknown_kid",
    "alg_none",
    "hs256_public_key",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "issuer_other_tenant",
    "wrong_audience",
    "tampered",
)
CODE_LIFETIME = 300.0  # seconds; Entra's codes live for minutes and are single-use
_PENDING_LIFETIME = 900.0
_OIDC_SCOPES = {"openid", "profile", "email", "offline_access"}
_MULTI_TENANT_ALIASES = {"common", "organizations"}
_NS = uuid.UUID("8a0e6c52-3f1b-4d7e-9b25-61c4f0a9d3e7")

UserKind = Literal["admin", "approver", "clinician", "staff"]


@dataclass(frozen=True)
class EntraTenant:
    tid: str
    name: str
    domain: str  # its initial domain, e.g. contosohealth.onmicrosoft.com


@dataclass
class EntraUser:
    oid: str
    tid: str
    upn: str
    display_name: str
    given_name: str
    surname: str
    kind: UserKind
    roles: tuple[str, ...] = ()  # app roles assigned for the connector's API
    ehr_practitioner_id: str | None = None  # the matching Practitioner in the EHR seed
    disabled: bool = False
    # Who to pick for each configuration-portal persona (PORTAL_PERSONAS); None for others.
    portal_persona: str | None = None


# --- seed -----------------------------------------------------------------------------------------

CONTOSO_TID = "3f8d2a6b-5c1e-4b7a-9e2d-7a41c0b8e915"
FABRIKAM_TID = "b2c7e914-0a6d-4f3b-8c51-d96e2f70a3c4"
TENANTS: dict[str, EntraTenant] = {
    CONTOSO_TID: EntraTenant(CONTOSO_TID, "Contoso Health", "contosohealth.onmicrosoft.com"),
    FABRIKAM_TID: EntraTenant(FABRIKAM_TID, "Fabrikam Clinics", "fabrikamclinics.onmicrosoft.com"),
}


def _ehr_people() -> list[tuple[str, str, UserKind, str | None]]:
    """(given, family, kind, practitioner id) for Contoso Health, matching the EHR seed's names."""
    try:
        from devtools.sandbox import seed

        people: list[tuple[str, str, UserKind, str | None]] = []
        kinds: dict[str, UserKind] = {
            "clinician": "clinician",
            "analyst": "approver",
            "interpreter": "staff",
        }
        for p in seed.PRACTITIONERS.values():
            kind = kinds.get(str(p.role))
            if kind is not None:
                people.append((p.given, p.family, kind, p.id))
        if people:
            return people
    except Exception:
        pass
    return [
        ("Oriana", "Quillfeather", "clinician", None),
        ("Thaddeus", "Brindlecombe", "clinician", None),
        ("Marisol", "Vantongeren", "clinician", None),
        ("Ysolde", "Karamanlis", "staff", None),
        ("Perpetua", "Thornwhistle", "approver", None),
    ]


def _make_user(
    tenant: EntraTenant,
    given: str,
    family: str,
    kind: UserKind,
    *,
    upn_local: str | None = None,
    practitioner_id: str | None = None,
    persona: str | None = None,
    roles: tuple[str, ...] | None = None,
) -> EntraUser:
    local = upn_local or f"{given}.{family}".lower()
    upn = f"{local}@{tenant.domain}"
    if roles is None:
        roles = (ADMIN_ROLE,) if kind == "admin" else ()
    return EntraUser(
        oid=str(uuid.uuid5(_NS, upn)),
        tid=tenant.tid,
        upn=upn,
        display_name=f"{given} {family}",
        given_name=given,
        surname=family,
        kind=kind,
        roles=roles,
        ehr_practitioner_id=practitioner_id,
        portal_persona=persona,
    )


def _seed_users() -> dict[str, EntraUser]:
    contoso, fabrikam = TENANTS[CONTOSO_TID], TENANTS[FABRIKAM_TID]
    users = [
        _make_user(contoso, "Leopoldine", "Achterberg", "admin", upn_local="admin", persona="admin")
    ]
    for given, family, kind, prac in _ehr_people():
        local = "ehr.analyst" if kind == "approver" else None
        users.append(
            _make_user(
                contoso,
                given,
                family,
                kind,
                upn_local=local,
                practitioner_id=prac,
                persona="approver" if kind == "approver" else None,
            )
        )
    users += [
        # A small health system's IT lead: Connector.Admin and the EHR analyst who approves.
        _make_user(
            contoso,
            "Ismenia",
            "Folkestad",
            "admin",
            upn_local="it.lead",
            persona="admin-approver",
        ),
        # Compliance: Connector.Auditor reads configurations, their history and the reports.
        _make_user(
            contoso,
            "Thaddea",
            "Wintermoor",
            "staff",
            upn_local="compliance",
            persona="auditor",
            roles=(AUDITOR_ROLE,),
        ),
        # Signed in to the portal with no app role and named approver of nothing.
        _make_user(
            contoso, "Casimir", "Wendelboe", "staff", upn_local="front.desk", persona="no-role"
        ),
        _make_user(fabrikam, "Evander", "Muirhollow", "admin", upn_local="admin"),
        _make_user(fabrikam, "Ottoline", "Brackenridge", "approver", upn_local="ehr.analyst"),
        _make_user(fabrikam, "Cornelius", "Ashgrove-Tiller", "clinician"),
    ]
    return {u.oid: u for u in users}


USERS: dict[str, EntraUser] = _seed_users()

PORTAL_PERSONAS: dict[str, str] = {
    "admin": "Microsoft 365 admin (Connector.Admin): registers FHIR base URLs, names approvers",
    "approver": "EHR analyst: signs in to the EHR for a configuration, approves it",
    "admin-approver": "admin who is also the approver (Connector.Admin, names themselves)",
    "auditor": "compliance (Connector.Auditor): reads configurations and usage reports",
    "no-role": "a user with no app role and no configuration to approve",
}
"""The configuration portal's personas (``EntraUser.portal_persona``) and what each does."""


def _sensitive() -> list[str]:
    values: list[str] = []
    for u in USERS.values():
        values += [u.display_name, u.given_name, u.surname]
        if u.kind in ("clinician", "staff"):  # staff UPNs (admin, approver) may be stored
            values.append(u.upn)
    return list(dict.fromkeys(values))


SENSITIVE_VALUES: list[str] = _sensitive()
"""Display names (full, given, family) of every seeded user and the UPNs of clinicians/staff."""


# --- errors ---------------------------------------------------------------------------------------


class _OAuthError(Exception):
    def __init__(self, error: str, code: int, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error = error
        self.code = code
        self.message = message
        self.status = status


def _aadsts_body(error: str, code: int, message: str) -> dict[str, Any]:
    trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {message} Trace ID: {trace} Correlation ID: {corr} Timestamp: {stamp}"
        ),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


@dataclass
class _Fault:
    status: int
    retry_after: float | None
    body: dict[str, Any] | None


@dataclass
class _PendingAuth:
    tenant: str  # the path segment (tid, common or organizations)
    tid: str | None  # None for multi-tenant aliases
    params: dict[str, str]
    created: float = field(default_factory=time.monotonic)


@dataclass
class _AuthCode:
    client_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    oid: str
    tid: str
    issued: float = field(default_factory=time.monotonic)
    used: bool = False


@dataclass
class _RefreshGrant:
    client_id: str
    oid: str
    tid: str
    scope: str


class SandboxEntra:
    """The Entra ID stand-in. ``app`` is the Starlette app; :meth:`set_base_url` once served."""

    def __init__(
        self,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        redirect_uris: Sequence[str] = (),
        graph_roles: Sequence[str] = DEFAULT_GRAPH_ROLES,
        app_name: str = "EHR virtual-visit connector",
        base_url: str = "",
        tenants: Mapping[str, EntraTenant] | None = None,
        users: Mapping[str, EntraUser] | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris: list[str] = list(redirect_uris)
        self.app_name = app_name
        self.tenants: dict[str, EntraTenant] = dict(tenants if tenants is not None else TENANTS)
        self.users: dict[str, EntraUser] = {
            oid: EntraUser(**vars(u)) for oid, u in (users or USERS).items()
        }
        # application permissions granted (admin consent) per tenant
        self.graph_roles: dict[str, tuple[str, ...]] = {
            tid: tuple(graph_roles) for tid in self.tenants
        }
        self.client_certificates: list[Any] = []  # public keys accepted for private_key_jwt
        self._keys: list[SigningKey] = [SigningKey.generate()]
        self._lock = threading.RLock()
        self._pending: dict[str, _PendingAuth] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._refresh: dict[str, _RefreshGrant] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests
        self._base_url = base_url.rstrip("/")
        # Connection: close on every response. Idle keep-alive TLS connections (msal's requests
        # session) would otherwise hold uvicorn's shutdown for its full timeout.
        self.app = Starlette(routes=self._routes(), middleware=[Middleware(_CloseConnections)])

    # --- configuration ------------------------------------------------------------------------

    def set_base_url(self, url: str) -> None:
        self._base_url = url.rstrip("/")

    @property
    def url(self) -> str:
        """The authority host, e.g. ``https://127.0.0.1:54321`` (ENTRA_AUTHORITY_HOST)."""
        return self._base_url

    def authority(self, tenant: str) -> str:
        return f"{self.url}/{tenant}"

    def issuer(self, tid: str) -> str:
        return f"{self.url}/{tid}/v2.0"

    @staticmethod
    def issuer_v1(tid: str) -> str:
        return f"https://sts.windows.net/{tid}/"

    def jwks_uri(self, tenant: str) -> str:
        return f"{self.url}/{tenant}/discovery/v2.0/keys"

    def token_endpoint(self, tenant: str) -> str:
        return f"{self.url}/{tenant}/oauth2/v2.0/token"

    def add_redirect_uri(self, uri: str) -> None:
        with self._lock:
            if uri not in self.redirect_uris:
                self.redirect_uris.append(uri)

    def add_client_certificate(self, certificate_pem: bytes) -> None:
        """Accept ``private_key_jwt`` client assertions signed by this certificate's key."""
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(certificate_pem)
        self.client_certificates.append(cert.public_key())

    # --- seed access --------------------------------------------------------------------------

    def users_in(self, tid: str) -> list[EntraUser]:
        return [u for u in self.users.values() if u.tid == tid]

    def user_by_upn(self, upn: str) -> EntraUser:
        for user in self.users.values():
            if user.upn.lower() == upn.lower():
                return user
        raise KeyError(upn)

    def persona(self, name: str, tid: str = CONTOSO_TID) -> EntraUser:
        """The user to pick for a portal persona (``PORTAL_PERSONAS``) in that tenant."""
        for user in self.users_in(tid):
            if user.portal_persona == name:
                return user
        raise KeyError(name)

    def user_for_practitioner(self, practitioner_id: str) -> EntraUser:
        for user in self.users.values():
            if user.ehr_practitioner_id == practitioner_id:
                return user
        raise KeyError(practitioner_id)

    def tenant_by_name(self, name: str) -> EntraTenant:
        for tenant in self.tenants.values():
            if tenant.name == name:
                return tenant
        raise KeyError(name)

    # --- keys and token minting ---------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        with self._lock:
            return self._keys[-1]

    @property
    def keys(self) -> list[SigningKey]:
        with self._lock:
            return list(self._keys)

    def rotate_signing_key(self) -> str:
        """Publish a new key (the JWKS then lists old and new); new tokens use it. Returns kid."""
        key = SigningKey.generate()
        with self._lock:
            self._keys.append(key)
        return key.kid

    def retire_signing_key(self, kid: str) -> None:
        """Stop publishing a key (tokens it signed no longer verify)."""
        with self._lock:
            if len(self._keys) == 1:
                raise ValueError("cannot retire the only signing key")
            self._keys = [k for k in self._keys if k.kid != kid]

    def jwks(self, *, issuer: str | None = None) -> dict[str, Any]:
        return {"keys": [k.jwk(issuer=issuer) for k in self.keys]}

    def _key(self, kid: str | None) -> SigningKey:
        if kid is None:
            return self.signing_key
        for key in self.keys:
            if key.kid == kid:
                return key
        raise KeyError(f"no signing key {kid!r} (known: {[k.kid for k in self.keys]})")

    def _sign(self, claims: dict[str, Any], *, kid: str | None = None, alg: str = "RS256") -> str:
        key = self._key(kid)
        headers = {"typ": "JWT", "kid": key.kid, "x5t": key.x5t}
        return jwt.encode(claims, key.private_key, algorithm=alg, headers=headers)

    def _pairwise_sub(self, oid: str, client_id: str) -> str:
        return b64url(hashlib.sha256(f"{oid}|{client_id}".encode()).digest())

    def service_principal_oid(self, tid: str, client_id: str | None = None) -> str:
        return str(uuid.uuid5(_NS, f"sp|{tid}|{client_id or self.client_id}"))

    def _base_claims(self, *, tid: str, iss: str, aud: str, lifetime: int) -> dict[str, Any]:
        now = int(time.time())
        return {
            "aud": aud,
            "iss": iss,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "aio": b64url(secrets.token_bytes(24)),
            "rh": "0.A" + b64url(secrets.token_bytes(30)) + ".",
            "tid": tid,
            "uti": b64url(secrets.token_bytes(16)),
        }

    def portal_claims(
        self,
        *,
        tid: str,
        oid: str | None = None,
        roles: Iterable[str] = (),
        preferred_username: str | None = None,
        aud: str | None = None,
        expires_in: int = 3600,
        scp: str | None = "access_as_user",
        extra_claims: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        user = self.users.get(oid) if oid else None
        oid = oid or str(uuid.uuid4())
        claims = self._base_claims(
            tid=tid, iss=self.issuer(tid), aud=aud or f"api://{self.client_id}", lifetime=expires_in
        )
        claims.update(
            {
                "azp": self.client_id,
                "azpacr": "1",
                "name": user.display_name if user else (preferred_username or "Sandbox User"),
                "oid": oid,
                "preferred_username": preferred_username or (user.upn if user else None),
                "sub": self._pairwise_sub(oid, self.client_id),
                "ver": "2.0",
            }
        )
        if claims["preferred_username"] is None:
            del claims["preferred_username"]
        if scp:
            claims["scp"] = scp
        role_list = list(roles)
        if role_list:
            claims["roles"] = role_list
        if extra_claims:
            claims.update(extra_claims)
        return claims

    def mint_access_token(
        self,
        *,
        tid: str,
        oid: str | None = None,
        roles: Iterable[str] = (),
        preferred_username: str | None = None,
        aud: str | None = None,
        expires_in: int = 3600,
        kid: str | None = None,
        alg: str = "RS256",
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A portal access token (v2, ``aud`` api://{client_id}) signed by a key in the JWKS.

        ``oid`` of a seeded user fills ``name``/``preferred_username`` from the seed; ``roles`` are
        the app roles (e.g. ``[ADMIN_ROLE]``; the seed's own roles are *not* added automatically).
        ``alg`` may be RS256/RS384/RS512/PS256 (same RSA key) or ``none``/``HS256`` (forgeries).
        """
        claims = self.portal_claims(
            tid=tid,
            oid=oid,
            roles=roles,
            preferred_username=preferred_username,
            aud=aud,
            expires_in=expires_in,
            extra_claims=extra_claims,
        )
        if alg == "none":
            return unsigned_jwt(claims, kid=self._key(kid).kid)
        if alg == "HS256":
            key = self._key(kid)
            return hs256_jwt(claims, key.public_pem(), kid=key.kid)
        return self._sign(claims, kid=kid, alg=alg)

    def mint_user_token(self, upn: str, **kwargs: Any) -> str:
        """Portal token for a seeded user, with the user's own app roles unless given."""
        user = self.user_by_upn(upn)
        kwargs.setdefault("roles", user.roles)
        return self.mint_access_token(tid=user.tid, oid=user.oid, **kwargs)

    def mint_forged_token(self, kind: str, **claims: Any) -> str:
        """A token that a correct validator must refuse. ``kind`` is one of :data:`FORGED_KINDS`;
        ``claims`` are :meth:`mint_access_token` keyword arguments (``tid`` defaults to Contoso)."""
        claims.setdefault("tid", next(iter(self.tenants)))
        tid = claims["tid"]
        if kind == "unknown_kid":
            rogue = SigningKey.generate()
            body = self.portal_claims(**_portal_kwargs(claims))
            return jwt.encode(
                body,
                rogue.private_key,
                algorithm="RS256",
                headers={"typ": "JWT", "kid": rogue.kid, "x5t": rogue.x5t},
            )
        if kind == "alg_none":
            return self.mint_access_token(**{**claims, "alg": "none"})
        if kind == "hs256_public_key":
            return self.mint_access_token(**{**claims, "alg": "HS256"})
        if kind == "expired":
            now = int(time.time())
            extra: dict[str, Any] = {"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}
            return self.mint_access_token(**_merge_extra(claims, extra))
        if kind == "not_yet_valid":
            now = int(time.time())
            extra = {"iat": now + 3600, "nbf": now + 3600, "exp": now + 7200}
            return self.mint_access_token(**_merge_extra(claims, extra))
        if kind == "wrong_issuer":
            extra = {"iss": f"https://login.evil.example/{tid}/v2.0"}
            return self.mint_access_token(**_merge_extra(claims, extra))
        if kind == "issuer_other_tenant":
            other = next((t for t in self.tenants if t != tid), str(uuid.uuid4()))
            return self.mint_access_token(**_merge_extra(claims, {"iss": self.issuer(other)}))
        if kind == "wrong_audience":
            return self.mint_access_token(**{**claims, "aud": "api://some-other-app"})
        if kind == "tampered":
            token = self.mint_access_token(**claims)
            head, payload, sig = token.split(".")
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            body["roles"] = [ADMIN_ROLE]
            body["oid"] = str(uuid.uuid4())
            forged = b64url(json.dumps(body, separators=(",", ":")).encode())
            return f"{head}.{forged}.{sig}"
        raise ValueError(f"unknown forged token kind {kind!r}; one of {FORGED_KINDS}")

    def graph_token_claims(self, tid: str, *, client_id: str | None = None) -> dict[str, Any]:
        client_id = client_id or self.client_id
        claims = self._base_claims(
            tid=tid, iss=self.issuer_v1(tid), aud=GRAPH_AUDIENCE, lifetime=3599
        )
        sp = self.service_principal_oid(tid, client_id)
        claims.update(
            {
                "app_displayname": self.app_name,
                "appid": client_id,
                "appidacr": "1",
                "idp": self.issuer_v1(tid),
                "idtyp": "app",
                "oid": sp,
                "sub": sp,
                "ver": "1.0",
                "xms_tcdt": 1600000000,
            }
        )
        roles = list(self.graph_roles.get(tid, ()))
        if roles:
            claims["roles"] = roles
        return claims

    def mint_graph_token(self, tid: str, **overrides: Any) -> str:
        """An app-only Graph token as the client-credentials grant issues it."""
        claims = self.graph_token_claims(tid)
        claims.update(overrides)
        return self._sign(claims)

    def mint_delegated_graph_token(self, upn: str, scopes: str = "User.ReadBasic.All") -> str:
        """A delegated Graph token for a seeded user, as the authorization code or refresh
        token grant issues it for Graph scopes (``scp`` = ``scopes``)."""
        user = self.user_by_upn(upn)
        graph_scopes = " ".join(f"{GRAPH_AUDIENCE}/{s}" for s in scopes.split())
        tokens = self._user_tokens(user, self.client_id, graph_scopes, nonce=None)
        return str(tokens["access_token"])

    def mint_notification_validation_token(self, tid: str) -> str:
        """A ``validationTokens`` entry of a rich Graph notification (aud = our app id)."""
        claims = self._base_claims(
            tid=tid, iss=self.issuer_v1(tid), aud=self.client_id, lifetime=3600
        )
        claims.update(
            {
                "appid": GRAPH_CHANGE_TRACKING_APP_ID,
                "appidacr": "2",
                "idp": self.issuer_v1(tid),
                "ver": "1.0",
            }
        )
        return self._sign(claims)

    def verify_token(
        self, token: str, *, audience: str | Iterable[str], issuers: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Verify a token this stand-in issued (signature by kid, exp/nbf, aud, iss).

        Raises ``jwt.PyJWTError`` on any failure. Used in-process by the Graph stand-in.
        """
        header = jwt.get_unverified_header(token)
        if header.get("alg") not in ("RS256", "RS384", "RS512", "PS256"):
            raise jwt.InvalidAlgorithmError(f"alg {header.get('alg')!r} not accepted")
        try:
            key = self._key(header.get("kid") or "")
        except KeyError as exc:
            raise jwt.InvalidKeyError("unknown kid") from exc
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public_key,
            algorithms=[header["alg"]],
            audience=audience,
            options={"require": ["exp", "iat", "aud", "iss", "tid"]},
            leeway=30,
        )
        tid = claims["tid"]
        allowed = set(issuers) if issuers is not None else {self.issuer(tid), self.issuer_v1(tid)}
        if claims["iss"] not in allowed or tid not in self.tenants:
            raise jwt.InvalidIssuerError(f"issuer {claims['iss']!r} not accepted")
        return claims

    # --- test hooks ---------------------------------------------------------------------------

    def fail_next(
        self,
        endpoint: str = "token",
        status: int = 500,
        count: int = 1,
        *,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        """The next ``count`` requests to ``endpoint`` (``token``, ``authorize``,
        ``openid-configuration`` or ``keys``) answer ``status`` with an AADSTS-shaped body."""
        if endpoint not in ("token", "authorize", "openid-configuration", "keys"):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        with self._lock:
            self._faults.setdefault(endpoint, []).extend(
                _Fault(status, retry_after, body) for _ in range(count)
            )

    def set_user_disabled(self, oid: str, disabled: bool = True) -> None:
        """A disabled user's sign-in ends with ``error=access_denied`` (AADSTS50057)."""
        with self._lock:
            self.users[oid].disabled = disabled

    def set_graph_roles(self, tid: str, roles: Sequence[str]) -> None:
        """Application permissions consented in ``tid`` (the ``roles`` of Graph app tokens)."""
        with self._lock:
            self.graph_roles[tid] = tuple(roles)

    def reset(self) -> None:
        """Forget faults, codes and pending sign-ins; re-enable every user."""
        with self._lock:
            self._faults.clear()
            self._pending.clear()
            self._codes.clear()
            self._refresh.clear()
            for user in self.users.values():
                user.disabled = False

    def _take_fault(self, endpoint: str) -> Response | None:
        with self._lock:
            queue = self._faults.get(endpoint)
            if not queue:
                return None
            fault = queue.pop(0)
        body = fault.body or _aadsts_body(
            "temporarily_unavailable"
            if fault.status >= 500 or fault.status == 429
            else "invalid_request",
            50196 if fault.status == 429 else 90033,
            "The server is temporarily unavailable (sandbox fault injection).",
        )
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        return JSONResponse(body, status_code=fault.status, headers=headers)

    # --- HTTP ---------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        return [
            Route("/", self._index),
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_v2),
            Route("/{tenant}/.well-known/openid-configuration", self._openid_v1),
            Route("/{tenant}/discovery/v2.0/keys", self._keys_v2),
            Route("/{tenant}/discovery/keys", self._keys_v1),
            Route("/{tenant}/oauth2/v2.0/authorize", self._authorize, methods=["GET", "POST"]),
            Route("/{tenant}/oauth2/v2.0/authorize/select", self._select),
            Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
            Route("/{tenant}/oauth2/v2.0/logout", self._logout, methods=["GET", "POST"]),
        ]

    def _host(self, request: Request) -> str:
        return self._base_url or str(request.base_url).rstrip("/")

    def _resolve_tenant(self, tenant: str) -> str | None:
        """tid for a tenant path segment; None for common/organizations. KeyError if unknown."""
        t = tenant.lower()
        if t in _MULTI_TENANT_ALIASES:
            return None
        if t in self.tenants:
            return t
        for ten in self.tenants.values():
            if ten.domain.lower() == t:
                return ten.tid
        raise KeyError(tenant)

    def _tenant_not_found(self, tenant: str) -> JSONResponse:
        body = _aadsts_body(
            "invalid_tenant",
            90002,
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and "
            "are signing into the correct cloud.",
        )
        return JSONResponse(body, status_code=400)

    async def _index(self, request: Request) -> HTMLResponse:
        host = self._host(request)
        rows = []
        for ten in self.tenants.values():
            rows.append(
                f"<h2>{html.escape(ten.name)}</h2><p>tenant id <code>{ten.tid}</code>, "
                f"authority <code>{host}/{ten.tid}</code></p><ul>"
            )
            for u in self.users_in(ten.tid):
                rows.append(
                    f"<li>{html.escape(u.display_name)} &lt;{html.escape(u.upn)}&gt; "
                    f"({u.kind}) oid <code>{u.oid}</code></li>"
                )
            rows.append("</ul>")
        return HTMLResponse(_page("Entra ID (sandbox)", "".join(rows)))

    async def _openid_v2(self, request: Request) -> Response:
        self.requests.append(("GET", request.url.path))
        if (fault := self._take_fault("openid-configuration")) is not None:
            return fault
        tenant = request.path_params["tenant"]
        try:
            tid = self._resolve_tenant(tenant)
        except KeyError:
            return self._tenant_not_found(tenant)
        host = self._host(request)
        seg = tid or tenant.lower()
        issuer = f"{host}/{tid}/v2.0" if tid else f"{host}/{{tenantid}}/v2.0"
        config = {
            "token_endpoint": f"{host}/{seg}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{host}/{seg}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer,
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{host}/{seg}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{host}/{seg}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{host}/{seg}/oauth2/v2.0/logout",
            "claims_supported": [
                "sub",
                "iss",
                "cloud_instance_name",
                "cloud_instance_host_name",
                "cloud_graph_host_name",
                "msgraph_host",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "acr",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "at_hash",
                "c_hash",
                "email",
            ],
            "code_challenge_methods_supported": ["plain", "S256"],
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        return JSONResponse(config)

    async def _openid_v1(self, request: Request) -> Response:
        if (fault := self._take_fault("openid-configuration")) is not None:
            return fault
        tenant = request.path_params["tenant"]
        try:
            tid = self._resolve_tenant(tenant)
        except KeyError:
            return self._tenant_not_found(tenant)
        host = self._host(request)
        seg = tid or tenant.lower()
        return JSONResponse(
            {
                "token_endpoint": f"{host}/{seg}/oauth2/token",
                "jwks_uri": f"{host}/{seg}/discovery/keys",
                "issuer": self.issuer_v1(tid) if tid else "https://sts.windows.net/{tenantid}/",
                "authorization_endpoint": f"{host}/{seg}/oauth2/authorize",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _keys_v2(self, request: Request) -> Response:
        self.requests.append(("GET", request.url.path))
        if (fault := self._take_fault("keys")) is not None:
            return fault
        tenant = request.path_params["tenant"]
        try:
            tid = self._resolve_tenant(tenant)
        except KeyError:
            return self._tenant_not_found(tenant)
        host = self._host(request)
        issuer = f"{host}/{tid}/v2.0" if tid else f"{host}/{{tenantid}}/v2.0"
        return JSONResponse(self.jwks(issuer=issuer))

    async def _keys_v1(self, request: Request) -> Response:
        if (fault := self._take_fault("keys")) is not None:
            return fault
        return JSONResponse(self.jwks())

    # authorize ---------------------------------------------------------------------------------

    def _error_page(self, title: str, code: int, message: str, status: int = 400) -> HTMLResponse:
        body = (
            f'<div class="error" data-error-code="AADSTS{code}"><h2>{html.escape(title)}</h2>'
            f"<p>AADSTS{code}: {html.escape(message)}</p></div>"
        )
        return HTMLResponse(_page("Sign in (sandbox)", body), status_code=status)

    def _error_redirect(
        self, params: Mapping[str, str], error: str, code: int, message: str
    ) -> Response:
        query = {"error": error, "error_description": f"AADSTS{code}: {message}"}
        if "state" in params:
            query["state"] = params["state"]
        return self._deliver(params, query)

    def _deliver(self, params: Mapping[str, str], query: Mapping[str, str]) -> Response:
        redirect_uri = params["redirect_uri"]
        if params.get("response_mode") == "form_post":
            inputs = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                for k, v in query.items()
            )
            body = (
                f'<form method="post" action="{html.escape(redirect_uri)}" id="f">{inputs}'
                '<noscript><button type="submit">Continue</button></noscript></form>'
                "<script>document.getElementById('f').submit()</script>"
            )
            return HTMLResponse(_page("Signing in (sandbox)", body))
        sep = "&" if "?" in redirect_uri else "?"
        if params.get("response_mode") == "fragment":
            sep = "#"
        return RedirectResponse(redirect_uri + sep + urlencode(query), status_code=302)

    async def _authorize(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        if (fault := self._take_fault("authorize")) is not None:
            return fault
        if request.method == "POST":
            params = await _form(request)
        else:
            params = dict(request.query_params)
        tenant = request.path_params["tenant"]
        try:
            tid = self._resolve_tenant(tenant)
        except KeyError:
            return self._error_page("Tenant not found", 90002, f"Tenant '{tenant}' not found.")
        client_id = params.get("client_id", "")
        if not client_id:
            return self._error_page(
                "Bad request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            )
        if client_id != self.client_id:
            return self._error_page(
                "Application not found",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            return self._error_page(
                "Redirect URI mismatch",
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                f"redirect URIs configured for the application '{self.client_id}'.",
            )
        if params.get("response_type") != "code":
            return self._error_redirect(
                params,
                "unsupported_response_type",
                700054,
                "response_type is not supported by this sandbox; use 'code'.",
            )
        if not params.get("scope"):
            return self._error_redirect(
                params,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        method = params.get("code_challenge_method")
        if params.get("code_challenge") and method not in (None, "S256", "plain"):
            return self._error_redirect(
                params,
                "invalid_request",
                501491,
                "Invalid size of Code_Challenge parameter or unsupported code_challenge_method.",
            )
        if params.get("prompt") == "none":
            return self._error_redirect(
                params,
                "login_required",
                50058,
                "A silent sign-in request was sent but no user is signed in.",
            )
        request_id = secrets.token_urlsafe(24)
        with self._lock:
            self._prune()
            self._pending[request_id] = _PendingAuth(tenant=tenant, tid=tid, params=params)
        return HTMLResponse(self._picker(request, tenant, tid, request_id, params))

    def _picker(
        self,
        request: Request,
        tenant: str,
        tid: str | None,
        request_id: str,
        params: Mapping[str, str],
    ) -> str:
        host = self._host(request)
        hint = params.get("login_hint", "").lower()
        tenants = [self.tenants[tid]] if tid else list(self.tenants.values())
        parts = [
            f"<p>Signing in to <strong>{html.escape(self.app_name)}</strong>. "
            "Pick an account (sandbox: no password).</p>"
        ]
        for ten in tenants:
            parts.append(
                f'<h2 class="tenant" data-tid="{ten.tid}">{html.escape(ten.name)}</h2>'
                '<ul class="accounts">'
            )
            users = sorted(self.users_in(ten.tid), key=lambda u: (u.upn.lower() != hint, u.upn))
            for u in users:
                href = f"{host}/{tenant}/oauth2/v2.0/authorize/select?" + urlencode(
                    {"request": request_id, "oid": u.oid}
                )
                classes = "account" + (" disabled" if u.disabled else "")
                hinted = ' data-hinted="true"' if u.upn.lower() == hint else ""
                persona = label = ""
                if u.portal_persona:
                    persona = (
                        f' data-persona="{html.escape(u.portal_persona)}"'
                        f' title="{html.escape(PORTAL_PERSONAS.get(u.portal_persona, ""))}"'
                    )
                    label = f" <small>portal: {html.escape(u.portal_persona)}</small>"
                parts.append(
                    f'<li><a class="{classes}" data-upn="{html.escape(u.upn)}" '
                    f'data-oid="{u.oid}" data-tid="{u.tid}" data-kind="{u.kind}"{hinted}{persona} '
                    f'href="{html.escape(href)}">{html.escape(u.display_name)}'
                    f" <small>{html.escape(u.upn)}</small>{label}</a></li>"
                )
            parts.append("</ul>")
        return _page("Sign in to your account (sandbox)", "".join(parts))

    async def _select(self, request: Request) -> Response:
        self.requests.append(("GET", request.url.path))
        request_id = request.query_params.get("request", "")
        oid = request.query_params.get("oid", "")
        with self._lock:
            self._prune()
            pending = self._pending.pop(request_id, None)
        if pending is None:
            return self._error_page(
                "Sign-in request expired",
                50011 if not request_id else 700005,
                "This sign-in request is no longer valid. Go back to the application and start "
                "again.",
            )
        user = self.users.get(oid)
        if user is None or (pending.tid is not None and user.tid != pending.tid):
            return self._error_page(
                "Account not in this tenant",
                50020,
                "User account does not exist in the tenant and cannot access the application.",
            )
        params = pending.params
        if user.disabled:
            return self._error_redirect(
                params,
                "access_denied",
                50057,
                "The user account is disabled. The user object in Active Directory backing this "
                "account has been disabled.",
            )
        code = b64url(secrets.token_bytes(48))
        with self._lock:
            self._codes[code] = _AuthCode(
                client_id=params["client_id"],
                redirect_uri=params["redirect_uri"],
                scope=params.get("scope", ""),
                nonce=params.get("nonce"),
                code_challenge=params.get("code_challenge"),
                code_challenge_method=(
                    params.get("code_challenge_method") or "plain"
                    if params.get("code_challenge")
                    else None
                ),
                oid=user.oid,
                tid=user.tid,
            )
        query = {"code": code}
        if "state" in params:
            query["state"] = params["state"]
        query["session_state"] = str(uuid.uuid5(_NS, f"session|{user.oid}"))
        if params.get("client_info") == "1":
            query["client_info"] = _client_info(user)
        return self._deliver(params, query)

    def _prune(self) -> None:
        now = time.monotonic()
        for rid in [r for r, p in self._pending.items() if now - p.created > _PENDING_LIFETIME]:
            del self._pending[rid]
        for c in [c for c, v in self._codes.items() if now - v.issued > 2 * CODE_LIFETIME]:
            del self._codes[c]

    # token ------------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        self.requests.append(("POST", request.url.path))
        if (fault := self._take_fault("token")) is not None:
            return fault
        form = await _form(request)
        tenant = request.path_params["tenant"]
        try:
            tid = self._resolve_tenant(tenant)
        except KeyError:
            return self._tenant_not_found(tenant)
        try:
            client_id = self._authenticate_client(request, form, tenant)
            grant = form.get("grant_type", "")
            if grant == "authorization_code":
                body = self._grant_code(form, tid, client_id)
            elif grant == "refresh_token":
                body = self._grant_refresh(form, tid, client_id)
            elif grant == "client_credentials":
                body = self._grant_client_credentials(form, tid, tenant)
            elif not grant:
                raise _OAuthError(
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'grant_type'.",
                )
            else:
                raise _OAuthError(
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{grant}'.",
                )
        except _OAuthError as err:
            return JSONResponse(
                _aadsts_body(err.error, err.code, err.message), status_code=err.status
            )
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate_client(self, request: Request, form: dict[str, str], tenant: str) -> str:
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:]).decode()
                basic_id, _, basic_secret = decoded.partition(":")
            except Exception as exc:
                raise _OAuthError(
                    "invalid_client", 7000216, "Malformed client authentication.", 401
                ) from exc
            client_id, secret = unquote_plus(basic_id), unquote_plus(basic_secret)
        if not client_id:
            raise _OAuthError(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            )
        if client_id != self.client_id:
            raise _OAuthError(
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'.",
            )
        assertion = form.get("client_assertion")
        if secret is not None:
            if not secrets.compare_digest(secret.encode(), self.client_secret.encode()):
                raise _OAuthError(
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    f"is the client secret value, not the client secret ID, for a secret added to "
                    f"app '{self.client_id}'.",
                    401,
                )
        elif assertion is not None:
            self._check_assertion(assertion, form, request)
        else:
            raise _OAuthError(
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
                401,
            )
        return client_id

    def _check_assertion(self, assertion: str, form: dict[str, str], request: Request) -> None:
        if form.get("client_assertion_type") != (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ):
            raise _OAuthError("invalid_client", 700025, "Invalid client_assertion_type.", 401)
        audience = self._host(request) + request.url.path
        for public_key in self.client_certificates:
            try:
                claims = jwt.decode(
                    assertion,
                    public_key,
                    algorithms=["RS256", "PS256"],
                    audience=audience,
                    options={"require": ["exp", "aud", "iss", "sub"]},
                )
            except jwt.PyJWTError:
                continue
            if claims.get("iss") == claims.get("sub") == self.client_id:
                return
        raise _OAuthError(
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
            401,
        )

    def _grant_code(self, form: dict[str, str], tid: str | None, client_id: str) -> dict[str, Any]:
        code_value = form.get("code", "")
        with self._lock:
            code = self._codes.get(code_value)
            first_use = code is not None and not code.used
            if code is not None:
                code.used = True  # consumed by any redemption attempt, good or bad
        if code is None:
            raise _OAuthError(
                "invalid_grant",
                9002313,
                "Invalid request. Request is malformed or invalid. (The provided value for the "
                "'code' parameter is not valid.)",
            )
        if not first_use:
            raise _OAuthError(
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        if time.monotonic() - code.issued > CODE_LIFETIME:
            raise _OAuthError(
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to inactivity.",
            )
        if code.client_id != client_id:
            raise _OAuthError(
                "invalid_grant",
                70000,
                "The provided value for the 'code' parameter is not valid. The code was issued to "
                "a different client.",
            )
        if form.get("redirect_uri", "") != code.redirect_uri:
            raise _OAuthError(
                "invalid_grant",
                500112,
                f"The reply address '{form.get('redirect_uri', '')}' does not match the reply "
                f"address '{code.redirect_uri}' provided when requesting Authorization code.",
            )
        if tid is not None and tid != code.tid:
            raise _OAuthError(
                "invalid_grant",
                50196,
                "The code was issued for a different tenant than the token endpoint's.",
            )
        if code.code_challenge is not None:
            verifier = form.get("code_verifier")
            if not verifier:
                raise _OAuthError(
                    "invalid_grant",
                    50148,
                    "The code_verifier does not match the code_challenge supplied in the "
                    "authorization request for PKCE.",
                )
            if code.code_challenge_method == "S256":
                computed = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
            else:
                computed = verifier
            if not secrets.compare_digest(computed, code.code_challenge):
                raise _OAuthError(
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the "
                    "authorization request.",
                )
        user = self.users[code.oid]
        if user.disabled:
            raise _OAuthError("invalid_grant", 50057, "The user account is disabled.")
        scope = form.get("scope") or code.scope
        if "offline_access" in code.scope.split() and "offline_access" not in scope.split():
            scope += " offline_access"  # consented at the authorize step
        return self._user_tokens(user, client_id, scope, nonce=code.nonce)

    def _grant_refresh(
        self, form: dict[str, str], tid: str | None, client_id: str
    ) -> dict[str, Any]:
        with self._lock:
            grant = self._refresh.get(form.get("refresh_token", ""))
        if grant is None or grant.client_id != client_id or (tid and tid != grant.tid):
            raise _OAuthError(
                "invalid_grant", 9002313, "Invalid request. The refresh token is not valid."
            )
        user = self.users[grant.oid]
        if user.disabled:
            raise _OAuthError("invalid_grant", 50057, "The user account is disabled.")
        return self._user_tokens(user, client_id, form.get("scope") or grant.scope, nonce=None)

    def _user_tokens(
        self, user: EntraUser, client_id: str, scope: str, *, nonce: str | None
    ) -> dict[str, Any]:
        scopes = scope.split()
        resource_scopes = [s for s in scopes if s not in _OIDC_SCOPES]
        api_prefixes = (f"api://{client_id}/", f"{client_id}/")
        if resource_scopes and all(s.startswith(api_prefixes) for s in resource_scopes):
            names = " ".join(s.rsplit("/", 1)[-1] for s in resource_scopes)
            access = self._sign(
                self.portal_claims(
                    tid=user.tid,
                    oid=user.oid,
                    roles=user.roles,
                    scp=names,
                )
            )
            granted = " ".join(resource_scopes)
        elif any(s.startswith(api_prefixes) for s in resource_scopes):
            raise _OAuthError(
                "invalid_scope",
                70011,
                "The provided request must include a 'scope' input parameter for a single "
                "resource.",
            )
        else:
            short = [s.rsplit("/", 1)[-1] for s in resource_scopes]
            graph_names = [n for n in short if n != ".default"] or ["User.Read"]
            claims = self._base_claims(
                tid=user.tid, iss=self.issuer_v1(user.tid), aud=GRAPH_APP_ID, lifetime=3599
            )
            claims.update(
                {
                    "appid": client_id,
                    "app_displayname": self.app_name,
                    "appidacr": "1",
                    "idtyp": "user",
                    "name": user.display_name,
                    "oid": user.oid,
                    "family_name": user.surname,
                    "given_name": user.given_name,
                    "scp": " ".join(graph_names),
                    "sub": self._pairwise_sub(user.oid, GRAPH_APP_ID),
                    "unique_name": user.upn,
                    "upn": user.upn,
                    "ver": "1.0",
                }
            )
            access = self._sign(claims)
            granted = " ".join(f"{GRAPH_AUDIENCE}/{n}" for n in graph_names)
        granted = " ".join([*(s for s in ("openid", "profile", "email") if s in scopes), granted])
        id_claims = self._base_claims(
            tid=user.tid, iss=self.issuer(user.tid), aud=client_id, lifetime=3600
        )
        id_claims.update(
            {
                "name": user.display_name,
                "oid": user.oid,
                "preferred_username": user.upn,
                "sid": str(uuid.uuid5(_NS, f"sid|{user.oid}")),
                "sub": self._pairwise_sub(user.oid, client_id),
                "ver": "2.0",
            }
        )
        if nonce is not None:
            id_claims["nonce"] = nonce
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": granted.strip(),
            "expires_in": 3599,
            "ext_expires_in": 3599,
            "access_token": access,
            "id_token": self._sign(id_claims),
            "client_info": _client_info(user),
        }
        if "offline_access" in scopes:
            refresh = b64url(secrets.token_bytes(48))
            with self._lock:
                self._refresh[refresh] = _RefreshGrant(client_id, user.oid, user.tid, scope)
            body["refresh_token"] = refresh
        return body

    def _grant_client_credentials(
        self, form: dict[str, str], tid: str | None, tenant: str
    ) -> dict[str, Any]:
        if tid is None:
            raise _OAuthError(
                "invalid_request",
                50059,
                f"No tenant-identifying information found in either the request or implied by "
                f"any provided credentials ('{tenant}' is not a tenant).",
            )
        scope = form.get("scope", "").strip()
        if not scope:
            raise _OAuthError(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise _OAuthError(
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        resource = scopes[0][: -len("/.default")]
        if resource in (GRAPH_AUDIENCE, GRAPH_APP_ID, "https://graph.microsoft.com/"):
            token = self._sign(self.graph_token_claims(tid))
        elif resource in (f"api://{self.client_id}", self.client_id):
            claims = self.portal_claims(tid=tid, oid=self.service_principal_oid(tid), scp=None)
            claims.pop("preferred_username", None)
            claims["name"] = self.app_name
            claims["idtyp"] = "app"
            token = self._sign(claims)
        else:
            raise _OAuthError(
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{self.tenants[tid].name}.",
            )
        return {
            "token_type": "Bearer",
            "expires_in": 3599,
            "ext_expires_in": 3599,
            "access_token": token,
        }

    async def _logout(self, request: Request) -> Response:
        target = request.query_params.get("post_logout_redirect_uri", "")
        allowed = {f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in self.redirect_uris}
        if target and f"{urlsplit(target).scheme}://{urlsplit(target).netloc}" in allowed:
            return RedirectResponse(target, status_code=302)
        return HTMLResponse(_page("Signed out (sandbox)", "<p>You signed out of your account.</p>"))


class _CloseConnections:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_close(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_close)


async def _form(request: Request) -> dict[str, str]:
    """application/x-www-form-urlencoded body (no python-multipart needed)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))


def _portal_kwargs(claims: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("tid", "oid", "roles", "preferred_username", "aud", "expires_in", "extra_claims")
    return {k: v for k, v in claims.items() if k in keep}


def _merge_extra(claims: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(claims)
    merged["extra_claims"] = {**(claims.get("extra_claims") or {}), **extra}
    return merged


def _client_info(user: EntraUser) -> str:
    return b64url(json.dumps({"uid": user.oid, "utid": user.tid}).encode())


_STYLE = (
    "body{font-family:Segoe UI,system-ui,sans-serif;max-width:40rem;margin:2rem auto;"
    "color:#1b1b1b}h1{font-size:1.4rem}ul{list-style:none;padding:0}"
    "a.account{display:block;padding:.7rem 1rem;margin:.3rem 0;border:1px solid #ccc;"
    "border-radius:4px;text-decoration:none;color:inherit}a.account:hover{background:#f3f3f3}"
    "a.account.disabled{opacity:.55}small{color:#666;margin-left:.5rem}.error{color:#a4262c}"
)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
