"""SMART App Launch 2.x client: discovery, authorize URLs, token exchange, id_token checks.

One ``SmartClient`` per process (``Container.smart``). Discovery documents and JWKS are cached
per URL with a TTL; backend-services tokens are cached until shortly before they expire. Every
failure becomes an ``EhrError`` whose detail names the step and the OAuth error code only (never
the EHR's free-text description, which may echo request values).

Confidential clients authenticate with ``private_key_jwt`` (an RS384 assertion signed with
``SMART_PRIVATE_KEY``) when the EHR advertises it; otherwise the code exchange runs as a public
client (``client_id`` + PKCE).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from connector_core.errors import EhrError

if TYPE_CHECKING:
    import httpx

    from connector_core.crypto import SigningKeys

__all__ = [
    "SmartClient",
    "SmartConfiguration",
    "SmartTokenResponse",
    "normalize_fhir_base",
]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ID_TOKEN_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384"]
_CLOCK_LEEWAY = 60  # seconds of clock skew tolerated on id_token times


def normalize_fhir_base(url: str) -> str:
    """The canonical FHIR base URL, exactly as the portal stores it (one function for both:
    ``fhir_probe.canonical_fhir_base_url``): lower-case scheme and host, no default port, no
    trailing '/'. Raises ``InvalidInputError`` for something that is not a base URL."""
    from connector_core.adapters.fhir_probe import canonical_fhir_base_url

    return canonical_fhir_base_url(url)


def _absolute_url(value: Any, what: str) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\t "):
        raise EhrError(f"The EHR's SMART configuration has no usable {what}.")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise EhrError(f"The EHR's SMART configuration has no usable {what}.")
    return value


def _str_tuple(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(v) for v in value if isinstance(v, str))


@dataclass(frozen=True)
class SmartConfiguration:
    """The parts of ``.well-known/smart-configuration`` the connector uses."""

    fhir_base_url: str
    issuer: str | None
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str | None
    code_challenge_methods_supported: tuple[str, ...]
    token_endpoint_auth_methods_supported: tuple[str, ...]
    token_endpoint_auth_signing_alg_values_supported: tuple[str, ...]
    capabilities: tuple[str, ...]
    grant_types_supported: tuple[str, ...]

    def supports_private_key_jwt(self) -> bool:
        if "private_key_jwt" not in self.token_endpoint_auth_methods_supported:
            return False
        algs = self.token_endpoint_auth_signing_alg_values_supported
        return not algs or "RS384" in algs

    def supports_s256(self) -> bool:
        return "S256" in self.code_challenge_methods_supported

    @classmethod
    def from_document(cls, fhir_base_url: str, doc: Mapping[str, Any]) -> SmartConfiguration:
        jwks = doc.get("jwks_uri")
        return cls(
            fhir_base_url=fhir_base_url,
            issuer=doc["issuer"] if isinstance(doc.get("issuer"), str) else None,
            authorization_endpoint=_absolute_url(
                doc.get("authorization_endpoint"), "authorization endpoint"
            ),
            token_endpoint=_absolute_url(doc.get("token_endpoint"), "token endpoint"),
            jwks_uri=_absolute_url(jwks, "JWKS URI") if jwks else None,
            code_challenge_methods_supported=_str_tuple(
                doc.get("code_challenge_methods_supported")
            ),
            token_endpoint_auth_methods_supported=_str_tuple(
                doc.get("token_endpoint_auth_methods_supported")
            ),
            token_endpoint_auth_signing_alg_values_supported=_str_tuple(
                doc.get("token_endpoint_auth_signing_alg_values_supported")
            ),
            capabilities=_str_tuple(doc.get("capabilities")),
            grant_types_supported=_str_tuple(doc.get("grant_types_supported")),
        )


class SmartTokenResponse(BaseModel):
    """A SMART token response. Launch context parameters are kept; anything else is in ``extra``."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret
    expires_in: int | None = None
    scope: str | None = None
    id_token: str | None = None
    patient: str | None = None
    encounter: str | None = None
    fhir_context: list[dict[str, Any]] = Field(default_factory=list, alias="fhirContext")
    need_patient_banner: bool | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SmartTokenResponse:
        known = {
            "access_token",
            "token_type",
            "expires_in",
            "scope",
            "id_token",
            "patient",
            "encounter",
            "fhirContext",
            "need_patient_banner",
        }
        values = {k: v for k, v in body.items() if k in known}
        context = values.get("fhirContext")
        values["fhirContext"] = [c for c in context if isinstance(c, dict)] if context else []
        extra = {k: v for k, v in body.items() if k not in known and k != "refresh_token"}
        return cls.model_validate({**values, "extra": extra})


@dataclass
class _Cached:
    value: Any
    expires_at: float


class _TtlCache:
    """A tiny thread-safe TTL cache (discovery documents, JWKS, backend tokens)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._items: dict[Any, _Cached] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def get(self, key: Any) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item.expires_at <= self._clock():
                del self._items[key]
                return None
            return item.value

    def put(self, key: Any, value: Any, ttl: float) -> None:
        with self._lock:
            self._items[key] = _Cached(value, self._clock() + ttl)

    def drop(self, key: Any) -> None:
        with self._lock:
            self._items.pop(key, None)


class SmartClient:
    """SMART on FHIR client for EHR launch, standalone launch and backend services."""

    def __init__(
        self,
        *,
        http: httpx.Client,
        signing_keys: SigningKeys,
        discovery_ttl_seconds: float = 3600,
        jwks_ttl_seconds: float = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._keys = signing_keys
        self._discovery_ttl = discovery_ttl_seconds
        self._jwks_ttl = jwks_ttl_seconds
        self._cache = _TtlCache(clock)
        self._fetch_locks: dict[Any, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- discovery ---------------------------------------------------------------------------
    def _lock_for(self, key: Any) -> threading.Lock:
        with self._locks_guard:
            return self._fetch_locks.setdefault(key, threading.Lock())

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError:
            raise EhrError(f"The EHR could not be reached for its {what}.") from None
        if response.status_code != 200:
            raise EhrError(f"The EHR answered {response.status_code} for its {what}.")
        try:
            body = response.json()
        except ValueError:
            raise EhrError(f"The EHR's {what} is not JSON.") from None
        if not isinstance(body, dict):
            raise EhrError(f"The EHR's {what} is not a JSON object.")
        return body

    def get_configuration(self, fhir_base_url: str) -> SmartConfiguration:
        """``{fhir_base_url}/.well-known/smart-configuration``, cached per base URL."""
        base = fhir_base_url.rstrip("/")
        key = ("smart", base)
        cached = self._cache.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        with self._lock_for(key):  # one fetch per issuer even under concurrent launches
            cached = self._cache.get(key)
            if cached is not None:
                return cached  # type: ignore[no-any-return]
            doc = self._get_json(f"{base}/.well-known/smart-configuration", "SMART configuration")
            smart = SmartConfiguration.from_document(base, doc)
            self._cache.put(key, smart, self._discovery_ttl)
            return smart

    # --- authorize ---------------------------------------------------------------------------
    def build_authorize_url(
        self,
        smart: SmartConfiguration,
        *,
        client_id: str,
        redirect_uri: str,
        scope: str,
        state: str,
        code_challenge: str,
        aud: str,
        launch: str | None = None,
        nonce: str | None = None,
    ) -> str:
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "aud": aud,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        if launch is not None:
            params["launch"] = launch
        if nonce is not None:
            params["nonce"] = nonce
        endpoint = smart.authorization_endpoint
        separator = "&" if urlsplit(endpoint).query else "?"
        return f"{endpoint}{separator}{urlencode(params)}"

    # --- token -------------------------------------------------------------------------------
    def _token_request(
        self, smart: SmartConfiguration, form: dict[str, str], what: str
    ) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.post(
                smart.token_endpoint,
                data=form,
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError:
            raise EhrError(f"The EHR's token endpoint could not be reached ({what}).") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or not isinstance(body, dict):
            code = body.get("error") if isinstance(body, dict) else None
            code_text = code if isinstance(code, str) and code.isascii() else "no error code"
            raise EhrError(
                f"The EHR refused the {what} ({response.status_code}, {code_text[:40]}).",
                oauthError=code_text[:40],
                ehrStatus=response.status_code,
            )
        if not isinstance(body.get("access_token"), str):
            raise EhrError(f"The EHR's {what} answer has no access token.")
        return body

    def _client_auth(self, smart: SmartConfiguration, client_id: str) -> dict[str, str]:
        if smart.supports_private_key_jwt():
            return {
                "client_assertion_type": JWT_BEARER,
                "client_assertion": self._keys.client_assertion(
                    client_id=client_id, audience=smart.token_endpoint
                ),
            }
        return {"client_id": client_id}

    def exchange_code(
        self,
        smart: SmartConfiguration,
        *,
        client_id: str,
        code: str,
        redirect_uri: str,
        code_verifier: str,
    ) -> SmartTokenResponse:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
            **self._client_auth(smart, client_id),
        }
        body = self._token_request(smart, form, "sign-in (code exchange)")
        try:
            return SmartTokenResponse.from_body(body)
        except ValueError:
            raise EhrError("The EHR's token response is malformed.") from None

    def backend_token(self, smart: SmartConfiguration, *, client_id: str, scope: str) -> str:
        """SMART Backend Services access token, cached until shortly before it expires."""
        if not smart.supports_private_key_jwt():
            raise EhrError(
                "The EHR does not advertise private_key_jwt client authentication, which SMART "
                "Backend Services needs.",
                action="Ask the EHR analyst to register the connector as a confidential "
                "asymmetric (JWKS) client.",
            )
        key = ("backend", smart.token_endpoint, client_id, scope)
        cached = self._cache.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        form = {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": self._keys.client_assertion(
                client_id=client_id, audience=smart.token_endpoint
            ),
        }
        body = self._token_request(smart, form, "backend services token request")
        token = str(body["access_token"])
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        ttl = max(0.0, min(lifetime - 60.0, lifetime * 0.9))
        if ttl > 0:
            self._cache.put(key, token, ttl)
        return token

    # --- FHIR --------------------------------------------------------------------------------
    def read_resource(
        self, fhir_base_url: str, reference: str, *, access_token: str
    ) -> dict[str, Any]:
        """``GET {base}/{Type}/{id}`` with a user's access token; the resource JSON."""
        import httpx

        rtype, _, rid = reference.partition("/")
        if not rtype.isalpha() or not rid:
            raise EhrError("Not a FHIR reference.")
        url = f"{fhir_base_url.rstrip('/')}/{rtype}/{quote(rid, safe='')}"
        try:
            response = self._http.get(
                url,
                headers={
                    "Authorization": f"Bearer {access_token}",
                    "Accept": "application/fhir+json",
                },
            )
        except httpx.HTTPError:
            raise EhrError("The EHR could not be reached for a FHIR read.") from None
        if response.status_code != 200:
            raise EhrError(
                f"The EHR answered {response.status_code} to a FHIR read.",
                ehrStatus=response.status_code,
            )
        try:
            body = response.json()
        except ValueError:
            raise EhrError("The EHR's FHIR resource is not JSON.") from None
        if not isinstance(body, dict) or body.get("resourceType") != rtype:
            raise EhrError("The EHR answered a FHIR read with another resource.")
        return body

    # --- id_token ----------------------------------------------------------------------------
    def _jwks(self, jwks_uri: str, *, refresh: bool) -> dict[str, Any]:
        key = ("jwks", jwks_uri)
        if not refresh:
            cached = self._cache.get(key)
            if cached is not None:
                return cached  # type: ignore[no-any-return]
        with self._lock_for(key):
            if not refresh:
                cached = self._cache.get(key)
                if cached is not None:
                    return cached  # type: ignore[no-any-return]
            jwks = self._get_json(jwks_uri, "signing keys (JWKS)")
            if not isinstance(jwks.get("keys"), list):
                raise EhrError("The EHR's JWKS has no keys.")
            self._cache.put(key, jwks, self._jwks_ttl)
            return jwks

    def _signing_key(self, jwks_uri: str, kid: str | None, alg: str) -> Any:
        import jwt

        for refresh in (False, True):  # an unknown kid triggers one refetch (key rollover)
            jwks = self._jwks(jwks_uri, refresh=refresh)
            for jwk in jwks["keys"]:
                if not isinstance(jwk, dict):
                    continue
                if kid is not None and jwk.get("kid") != kid:
                    continue
                if jwk.get("use") not in (None, "sig"):
                    continue
                try:
                    return jwt.PyJWK(jwk, algorithm=alg).key
                except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                    continue
        raise EhrError("The EHR's id_token is signed with a key it does not publish.")

    def validate_id_token(
        self,
        smart: SmartConfiguration,
        id_token: str,
        *,
        client_id: str,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        """The id_token's claims, verified against the EHR's JWKS when it publishes one."""
        import jwt

        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise EhrError("The EHR's id_token is not a valid JWT.") from None
        alg = header.get("alg")
        issuer = smart.issuer
        try:
            if smart.jwks_uri:
                if alg not in _ID_TOKEN_ALGS:
                    raise EhrError("The EHR's id_token uses an unacceptable signature algorithm.")
                kid = header.get("kid")
                key = self._signing_key(
                    smart.jwks_uri, kid if isinstance(kid, str) else None, str(alg)
                )
                claims: dict[str, Any] = jwt.decode(
                    id_token,
                    key,
                    algorithms=[str(alg)],
                    audience=client_id,
                    issuer=issuer,
                    leeway=_CLOCK_LEEWAY,
                    options={"require": ["iss", "sub", "aud", "exp"], "verify_iss": bool(issuer)},
                )
            else:
                # No JWKS published: the token came straight from the token endpoint over TLS,
                # so its claims are taken as the EHR's statement; audience and times still apply.
                claims = jwt.decode(
                    id_token,
                    options={"verify_signature": False},
                    algorithms=_ID_TOKEN_ALGS,
                )
                now = time.time()
                aud = claims.get("aud")
                audiences = aud if isinstance(aud, list) else [aud]
                if client_id not in audiences:
                    raise EhrError("The EHR's id_token was issued to another client.")
                exp = claims.get("exp")
                if isinstance(exp, int | float) and exp + _CLOCK_LEEWAY < now:
                    raise EhrError("The EHR's id_token has expired.")
                if issuer and claims.get("iss") != issuer:
                    raise EhrError("The EHR's id_token comes from another issuer.")
        except jwt.ExpiredSignatureError:
            raise EhrError("The EHR's id_token has expired.") from None
        except jwt.InvalidAudienceError:
            raise EhrError("The EHR's id_token was issued to another client.") from None
        except jwt.InvalidIssuerError:
            raise EhrError("The EHR's id_token comes from another issuer.") from None
        except jwt.PyJWTError:
            raise EhrError("The EHR's id_token failed verification.") from None
        if nonce is not None and claims.get("nonce") not in (None, nonce):
            raise EhrError("The EHR's id_token does not belong to this sign-in (nonce).")
        return claims
