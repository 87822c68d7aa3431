"""Validates the Entra ID access tokens the configuration portal sends (``Authorization: Bearer``).

The connector is multi-tenant: a token's ``tid`` (read from the *unverified* token) only selects
which tenant's issuer and keys to check against; everything is then verified:

- header: ``alg`` must be ``RS256`` (no ``none``, no HMAC, no other algorithm), ``kid`` present;
- signature: against the key with that ``kid`` in the tenant's JWKS, found through
  ``{ENTRA_AUTHORITY_HOST}/{tid}/v2.0/.well-known/openid-configuration`` -> ``jwks_uri``
  (which must live on the authority host). Keys are cached per tenant with a TTL; an unknown
  ``kid`` refreshes them at most once per ``refresh_interval`` (Entra rolls keys), so forged
  ``kid`` values cannot make the connector hammer Entra;
- key fetches are bounded for unsigned input (the ``tid`` is read before any signature check):
  one fetch at a time per tenant (concurrent requests wait for its result), a tenant Entra
  does not know (400/404) is remembered for ``unknown_tenant_ttl``, a failed fetch (5xx,
  unreachable, invalid document) for ``failure_ttl`` (requests for that tenant then fail at
  once), and tenants not seen before may start at most ``new_tenants_per_minute`` fetches a
  minute in all (a flood of fresh ``tid`` values costs a bounded number of calls to Entra);
- ``iss`` equals ``{host}/{tid}/v2.0`` for the token's own ``tid``;
- ``aud`` is ``ENTRA_API_AUDIENCE`` (default ``api://{ENTRA_CLIENT_ID}``) or ``ENTRA_CLIENT_ID``;
- ``exp``/``nbf``/``iat`` with 60 s leeway.

Failures raise ``AuthenticationError`` (401) with a short reason; Entra being unreachable raises
``DependencyError`` (502): a token we could not check is never accepted.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connector_core.errors import AuthenticationError, DependencyError
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    import httpx

__all__ = ["ALLOWED_ALGORITHMS", "PortalTokenValidator"]

ALLOWED_ALGORITHMS = ("RS256",)
MAX_TOKEN_LENGTH = 16 * 1024
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_log = get_logger("entra_tokens")


@dataclass
class _TenantKeys:
    jwks_uri: str
    keys: dict[str, Any]  # kid -> public key object
    fetched_at: float
    last_refresh: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class PortalTokenValidator:
    """One per process (``Container.portal_tokens``); thread-safe."""

    def __init__(
        self,
        *,
        http: httpx.Client,
        authority_host: str,
        audiences: Sequence[str],
        leeway_seconds: int = 60,
        jwks_ttl_seconds: float = 3600.0,
        refresh_interval_seconds: float = 60.0,
        unknown_tenant_ttl_seconds: float = 300.0,
        failure_ttl_seconds: float = 30.0,
        new_tenants_per_minute: int = 30,
        max_tenants: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._host = authority_host.rstrip("/")
        self._audiences = [a for a in dict.fromkeys(audiences) if a]
        self._leeway = leeway_seconds
        self._ttl = jwks_ttl_seconds
        self._refresh_interval = refresh_interval_seconds
        self._unknown_ttl = unknown_tenant_ttl_seconds
        self._max_tenants = max_tenants
        self._clock = clock
        self._tenants: OrderedDict[str, _TenantKeys] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._failed: OrderedDict[str, float] = OrderedDict()
        self._failure_ttl = failure_ttl_seconds
        self._new_per_minute = new_tenants_per_minute
        self._new_budget = float(new_tenants_per_minute)
        self._new_budget_at = clock()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # JWKS documents fetched (tests and metrics)
        self.requests = 0  # calls to Entra (discovery and JWKS), successful or not

    def issuer(self, tid: str) -> str:
        return f"{self._host}/{tid}/v2.0"

    # --- public -------------------------------------------------------------------------------

    def validate(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; ``AuthenticationError`` when it is not acceptable."""
        import jwt

        if not token or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise AuthenticationError("The bearer token is not a JWT access token.")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthenticationError("The bearer token is malformed.") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthenticationError(
                f"The token's signing algorithm ({str(alg)[:20]}) is not accepted; Entra ID "
                "access tokens are signed with RS256."
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise AuthenticationError("The token has no key id (kid).")
        tid = unverified.get("tid")
        if not isinstance(tid, str) or not _GUID.match(tid):
            raise AuthenticationError("The token has no valid tenant id (tid).")
        tid = tid.lower()
        key = self._key(tid, kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(ALLOWED_ALGORITHMS),
                audience=self._audiences,
                issuer=self.issuer(tid),
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "tid"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The access token has expired; sign in again.") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("The access token is not valid yet.") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                "The access token was issued for another API (aud); request a token for the "
                "connector's API."
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError(
                "The access token's issuer does not match its tenant."
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("The access token's signature is not valid.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"The access token has no {exc.claim} claim.") from None
        except jwt.PyJWTError:
            raise AuthenticationError("The access token is not valid.") from None
        if str(claims.get("tid", "")).lower() != tid:
            raise AuthenticationError("The access token's tenant is inconsistent.")
        return claims

    # --- keys ---------------------------------------------------------------------------------

    @staticmethod
    def _remember(table: OrderedDict[str, float], tid: str, until: float, bound: int) -> None:
        table[tid] = until
        table.move_to_end(tid)
        while len(table) > bound:
            table.popitem(last=False)

    def _refuse_remembered(self, tid: str, now: float, *, fetching: bool) -> None:
        """Lock held: raise at once for a tenant Entra does not know, or, when its keys must be
        fetched, that Entra just failed for."""
        until = self._unknown.get(tid)
        if until is not None and until > now:
            raise AuthenticationError("The token's tenant is not known to Microsoft Entra ID.")
        until = self._failed.get(tid)
        if fetching and until is not None and until > now:
            raise DependencyError(
                "Microsoft Entra ID could not give this tenant's signing keys moments ago; try "
                "again shortly."
            )

    def _spend_new_tenant(self, now: float) -> None:
        """Lock held: a fetch for a tenant not seen before takes one of the minute's tokens."""
        rate = self._new_per_minute / 60.0
        self._new_budget = min(
            float(self._new_per_minute), self._new_budget + (now - self._new_budget_at) * rate
        )
        self._new_budget_at = now
        if self._new_budget < 1.0:
            raise DependencyError(
                "Too many sign-ins from organizations new to this connector right now; try "
                "again in a minute."
            )
        self._new_budget -= 1.0

    def _key(self, tid: str, kid: str) -> Any:
        now = self._clock()
        with self._lock:
            self._refuse_remembered(tid, now, fetching=False)
            entry = self._tenants.get(tid)
        if entry is None or now - entry.fetched_at > self._ttl:
            entry = self._load_once(tid, stale=entry)
        key = entry.keys.get(kid)
        if key is not None:
            return key
        # Unknown kid: Entra may have rolled its keys. Refresh once, rate-limited per tenant.
        with entry.lock:
            key = entry.keys.get(kid)
            if key is None and self._clock() - entry.last_refresh >= self._refresh_interval:
                entry = self._fetch(tid, previous=entry)
                key = entry.keys.get(kid)
        if key is None:
            raise AuthenticationError("The access token is signed with an unknown key (kid).")
        return key

    def _load_once(self, tid: str, *, stale: _TenantKeys | None) -> _TenantKeys:
        """The tenant's keys, fetched by one request at a time: the others wait and use the
        result (or meet the remembered failure)."""
        with self._lock:
            loading = self._loading.setdefault(tid, threading.Lock())
        try:
            with loading:
                now = self._clock()
                with self._lock:
                    self._refuse_remembered(tid, now, fetching=True)
                    entry = self._tenants.get(tid)
                    if entry is not None and now - entry.fetched_at <= self._ttl:
                        return entry  # fetched while this request waited
                    if entry is None and stale is None:
                        self._spend_new_tenant(now)
                return self._fetch(tid, previous=stale)
        finally:
            with self._lock:
                self._loading.pop(tid, None)

    def _fetch(self, tid: str, *, previous: _TenantKeys | None) -> _TenantKeys:
        try:
            return self._load(tid, previous=previous)
        except DependencyError:
            with self._lock:
                self._remember(
                    self._failed, tid, self._clock() + self._failure_ttl, self._max_tenants
                )
            log_event(_log, "entra.keys_failed", tenant_id=tid, retry_after=self._failure_ttl)
            raise

    def _load(self, tid: str, *, previous: _TenantKeys | None) -> _TenantKeys:
        now = self._clock()
        jwks_uri = previous.jwks_uri if previous is not None else self._discover(tid)
        document = self._get_json(jwks_uri, what="signing keys")
        keys = self._parse_jwks(document)
        entry = _TenantKeys(jwks_uri=jwks_uri, keys=keys, fetched_at=now, last_refresh=now)
        with self._lock:
            self.fetches += 1
            self._failed.pop(tid, None)
            self._tenants[tid] = entry
            self._tenants.move_to_end(tid)
            while len(self._tenants) > self._max_tenants:
                self._tenants.popitem(last=False)
        log_event(_log, "entra.jwks_loaded", tenant_id=tid, keys=len(keys))
        return entry

    def _discover(self, tid: str) -> str:
        url = f"{self._host}/{tid}/v2.0/.well-known/openid-configuration"
        doc = self._get_json(url, what="OpenID configuration", tenant=tid)
        issuer = doc.get("issuer")
        jwks_uri = doc.get("jwks_uri")
        if issuer != self.issuer(tid) or not isinstance(jwks_uri, str):
            raise DependencyError(
                "Microsoft Entra ID returned an unexpected OpenID configuration; check "
                "ENTRA_AUTHORITY_HOST."
            )
        if not jwks_uri.startswith(self._host + "/"):
            raise DependencyError(
                "The tenant's signing keys are not served by ENTRA_AUTHORITY_HOST; refused."
            )
        return jwks_uri

    def _get_json(self, url: str, *, what: str, tenant: str | None = None) -> dict[str, Any]:
        import httpx

        with self._lock:
            self.requests += 1
        try:
            response = self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError:
            raise DependencyError(
                f"Could not reach Microsoft Entra ID ({what}) to check the access token; try "
                "again shortly."
            ) from None
        if tenant is not None and response.status_code in (400, 404):
            with self._lock:
                self._remember(
                    self._unknown, tenant, self._clock() + self._unknown_ttl, self._max_tenants
                )
            raise AuthenticationError("The token's tenant is not known to Microsoft Entra ID.")
        if response.status_code != 200:
            raise DependencyError(
                f"Microsoft Entra ID answered HTTP {response.status_code} for its {what}; try "
                "again shortly."
            )
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise DependencyError(f"Microsoft Entra ID returned an invalid {what} document.")
        return doc

    @staticmethod
    def _parse_jwks(document: dict[str, Any]) -> dict[str, Any]:
        import jwt

        keys: dict[str, Any] = {}
        for jwk in document.get("keys") or []:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
                continue
            if jwk.get("use") not in (None, "sig") or jwk.get("alg") not in (None, "RS256"):
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str):
                continue
            try:
                keys[kid] = jwt.PyJWK(jwk, algorithm="RS256").key
            except jwt.PyJWTError:
                continue
        return keys
