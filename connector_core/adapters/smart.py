"""SMART App Launch 2.x client: discovery, authorize URLs, token exchange, id_token checks.

One ``SmartClient`` per process (``Container.smart``). Discovery documents and JWKS are cached
per URL with a TTL; backend-services tokens are cached until shortly before they expire. Every
failure becomes an ``EhrError`` whose detail names the step and the OAuth error code only (never
the EHR's free-text description, which may echo request values).

Every call goes through the guarded EHR client (``ehr_http``): discovery endpoints are
re-checked on each use, and pages see which step failed, never what the EHR answered (the log
has the status with the correlation id). Authorization responses are checked against the
authorization server's ``issuer`` (RFC 9207, ``verify_response_issuer``) and id_tokens as OpenID
Connect Core 3.1.3.7 asks (``SmartClient.validate_id_token``).

Confidential clients authenticate with ``private_key_jwt`` (an RS384 assertion signed with
``SMART_PRIVATE_KEY``) when the EHR advertises it; otherwise the code exchange runs as a public
client (``client_id`` + PKCE).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from connector_core.errors import (
    AuthenticationError,
    ConnectorError,
    EhrError,
    PermissionDeniedError,
)
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    import httpx

    from connector_core.adapters.ehr_http import EhrTargetPolicy
    from connector_core.crypto import SigningKeys

__all__ = [
    "SmartClient",
    "SmartConfiguration",
    "SmartTokenResponse",
    "normalize_fhir_base",
    "verify_response_issuer",
]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ID_TOKEN_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384"]
_CLOCK_LEEWAY = 60  # seconds of clock skew tolerated on id_token times
_log = get_logger("ehr")


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
    # RFC 9207: the server adds ``iss`` to every authorization response; then it is required.
    authorization_response_iss_parameter_supported: bool = False

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
            authorization_response_iss_parameter_supported=doc.get(
                "authorization_response_iss_parameter_supported"
            )
            is True,
        )


class SmartTokenResponse(BaseModel):
    """A SMART token response. Launch context parameters are kept; anything else is in ``extra``."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore", defer_build=True)

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
    """SMART on FHIR client for EHR launch, standalone launch and backend services.

    ``http`` must be the guarded EHR client (``ehr_http.guarded_client``) and ``policy`` the same
    policy: every endpoint a discovery document names is re-checked on every use.
    """

    def __init__(
        self,
        *,
        http: httpx.Client,
        signing_keys: SigningKeys,
        policy: EhrTargetPolicy,
        discovery_ttl_seconds: float = 3600,
        jwks_ttl_seconds: float = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._keys = signing_keys
        self._policy = policy
        self._discovery_ttl = discovery_ttl_seconds
        self._jwks_ttl = jwks_ttl_seconds
        self._cache = _TtlCache(clock)
        self._fetch_locks: dict[Any, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- failures: generic for the page, specific in the log ---------------------------------
    @staticmethod
    def _failure(
        message: str,
        *,
        step: str,
        status: int | None = None,
        error: BaseException | None = None,
        **extra: Any,
    ) -> ConnectorError:
        """An ``EhrError`` whose detail says which step failed, never what the EHR (or an
        internal address it pointed us at) answered; that goes to the log with the correlation
        id. A call the guard refused is a ``PermissionDeniedError`` (403) instead."""
        from connector_core.adapters.ehr_http import is_target_refusal

        refused = error is not None and is_target_refusal(error)
        log_event(
            _log,
            "ehr.call_failed",
            level=logging.WARNING,
            step=step,
            status=status if status is not None else "-",
            error=type(error).__name__ if error is not None else "-",
            refused_target=refused,
        )
        if refused:
            return PermissionDeniedError(
                f"The EHR's {step} endpoint is at an address the connector does not call.",
                reason="ehr_target_refused",
                action="Ask the EHR analyst to check the EHR's SMART configuration; an "
                "administrator can find the details in the log under the reference below.",
            )
        return EhrError(message, ehrStatus=status, **extra)

    # --- discovery ---------------------------------------------------------------------------
    def _lock_for(self, key: Any) -> threading.Lock:
        with self._locks_guard:
            return self._fetch_locks.setdefault(key, threading.Lock())

    def _get_json(self, url: str, what: str, step: str) -> dict[str, Any]:
        import httpx

        self._policy.check_url(url, what)
        try:
            response = self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as error:
            raise self._failure(
                f"The EHR could not be reached for its {what}.", step=step, error=error
            ) from None
        if response.status_code != 200:
            raise self._failure(
                f"The EHR did not provide its {what}.", step=step, status=response.status_code
            )
        try:
            body = response.json()
        except ValueError:
            raise self._failure(f"The EHR's {what} is not JSON.", step=step) from None
        if not isinstance(body, dict):
            raise self._failure(f"The EHR's {what} is not a JSON object.", step=step)
        return body

    def get_configuration(
        self, fhir_base_url: str, *, allowed_hosts: Iterable[str] = ()
    ) -> SmartConfiguration:
        """``{fhir_base_url}/.well-known/smart-configuration``, cached per base URL. Its
        endpoints are checked on every call (``EhrTargetPolicy.check_endpoint``) against the FHIR
        base's host and ``allowed_hosts`` (the allowance recorded on the configuration)."""
        base = fhir_base_url.rstrip("/")
        key = ("smart", base)
        smart = self._cache.get(key)
        if smart is None:
            with self._lock_for(key):  # one fetch per issuer even under concurrent launches
                smart = self._cache.get(key)
                if smart is None:
                    doc = self._get_json(
                        f"{base}/.well-known/smart-configuration",
                        "SMART configuration",
                        "discovery",
                    )
                    smart = SmartConfiguration.from_document(base, doc)
                    self._cache.put(key, smart, self._discovery_ttl)
        assert isinstance(smart, SmartConfiguration)
        hosts = tuple(allowed_hosts)
        endpoints = [
            (smart.authorization_endpoint, "authorization endpoint"),
            (smart.token_endpoint, "token endpoint"),
        ]
        if smart.jwks_uri:
            endpoints.append((smart.jwks_uri, "JWKS URI"))
        for url, what in endpoints:
            try:
                self._policy.check_endpoint(url, fhir_base_url=base, allowed_hosts=hosts, what=what)
            except PermissionDeniedError as error:
                log_event(
                    _log,
                    "ehr.endpoint_refused",
                    level=logging.WARNING,
                    endpoint=what,
                    reason=error.extra.get("reason", "-"),
                )
                raise
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
        except httpx.HTTPError as error:
            raise self._failure(
                f"The EHR's token endpoint could not be reached ({what}).",
                step="token",
                error=error,
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or not isinstance(body, dict):
            code = body.get("error") if isinstance(body, dict) else None
            code_text = code if isinstance(code, str) and code.isascii() else "no error code"
            code_text = "".join(c for c in code_text[:40] if c.isalnum() or c in "_-. ")
            if response.status_code == 400 and code_text == "invalid_grant":
                log_event(_log, "ehr.call_failed", level=logging.WARNING, step="token", status=400)
                # The code was used already, expired or not ours: the answer is bad, not the EHR.
                raise AuthenticationError(
                    f"The EHR refused the {what} (invalid_grant): this sign-in answer was "
                    "already used or has expired.",
                    reason="invalid_grant",
                    action="Start again from the EHR.",
                )
            raise self._failure(
                f"The EHR refused the {what} ({code_text}).",
                step="token",
                status=response.status_code,
                oauthError=code_text,
            )
        if not isinstance(body.get("access_token"), str):
            raise self._failure(f"The EHR's {what} answer has no access token.", step="token")
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

    @staticmethod
    def _backend_key(smart: SmartConfiguration, client_id: str, scope: str) -> tuple[str, ...]:
        return ("backend", smart.token_endpoint, client_id, scope)

    def backend_token(self, smart: SmartConfiguration, *, client_id: str, scope: str) -> str:
        """SMART Backend Services access token, cached until shortly before it expires (or
        until ``forget_backend_token``: the EHR rejected it)."""
        if not smart.supports_private_key_jwt():
            raise EhrError(
                "The EHR does not advertise private_key_jwt client authentication, which SMART "
                "Backend Services needs.",
                action="Ask the EHR analyst to register the connector as a confidential "
                "asymmetric (JWKS) client.",
            )
        key = self._backend_key(smart, client_id, scope)
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

    def forget_backend_token(
        self, smart: SmartConfiguration, *, client_id: str, scope: str
    ) -> None:
        """Drop a cached backend token the EHR rejected (revoked before its expiry)."""
        self._cache.drop(self._backend_key(smart, client_id, scope))

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
        self._policy.check_url(url, "FHIR endpoint")
        try:
            response = self._http.get(
                url,
                headers={
                    "Authorization": f"Bearer {access_token}",
                    "Accept": "application/fhir+json",
                },
            )
        except httpx.HTTPError as error:
            raise self._failure(
                "The EHR could not be reached for a FHIR read.", step="fhir-read", error=error
            ) from None
        if response.status_code != 200:
            raise self._failure(
                "The EHR did not answer a FHIR read.",
                step="fhir-read",
                status=response.status_code,
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
            jwks = self._get_json(jwks_uri, "signing keys (JWKS)", "jwks")
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
        raise _unverified("The EHR's id_token is signed with a key it does not publish.")

    def validate_id_token(
        self,
        smart: SmartConfiguration,
        id_token: str,
        *,
        client_id: str,
        nonce: str,
    ) -> dict[str, Any]:
        """The id_token's claims, checked as OpenID Connect Core 3.1.3.7 asks: ``iss`` equals
        the authorization server's ``issuer`` from discovery, ``aud`` contains ``client_id``,
        ``exp`` present and not past, ``nonce`` present and equal to the one sent, never
        ``alg: none``, and the signature verified against the EHR's JWKS whenever it publishes
        one. (Without a JWKS the token is taken as received from the token endpoint over TLS,
        which 3.1.3.7 item 6 allows; everything else is still checked.) A token that fails is an
        ``AuthenticationError`` (401: the sign-in answer cannot be trusted); an EHR that cannot
        be checked at all (no issuer, JWKS unreachable) an ``EhrError``."""
        import jwt

        issuer = smart.issuer
        if not issuer:
            raise EhrError(
                "The EHR's SMART configuration names no issuer, so its sign-in answer cannot "
                "be verified.",
                action="Ask the EHR vendor to publish 'issuer' in its "
                ".well-known/smart-configuration.",
            )
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise _unverified("The EHR's id_token is not a valid JWT.") from None
        alg = header.get("alg")
        if alg not in _ID_TOKEN_ALGS:
            raise _unverified("The EHR's id_token uses an unacceptable signature algorithm.")
        required: Any = {"require": ["iss", "sub", "aud", "exp", "nonce"]}
        try:
            if smart.jwks_uri:
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
                    options=required,
                )
            else:
                unsigned: Any = {
                    "verify_signature": False,
                    "verify_aud": True,
                    "verify_iss": True,
                    "verify_exp": True,
                    "verify_iat": True,
                    **required,
                }
                claims = jwt.decode(
                    id_token,
                    algorithms=_ID_TOKEN_ALGS,
                    audience=client_id,
                    issuer=issuer,
                    leeway=_CLOCK_LEEWAY,
                    options=unsigned,
                )
        except jwt.ExpiredSignatureError:
            raise _unverified("The EHR's id_token has expired.") from None
        except jwt.InvalidAudienceError:
            raise _unverified("The EHR's id_token was issued to another client.") from None
        except jwt.InvalidIssuerError:
            raise _unverified("The EHR's id_token comes from another issuer.") from None
        except jwt.MissingRequiredClaimError as error:
            if error.claim == "nonce":
                raise _unverified(
                    "The EHR's id_token does not belong to this sign-in (no nonce)."
                ) from None
            raise _unverified(f"The EHR's id_token has no '{error.claim}' claim.") from None
        except jwt.PyJWTError:
            raise _unverified("The EHR's id_token failed verification.") from None
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not hmac.compare_digest(token_nonce, nonce):
            raise _unverified("The EHR's id_token does not belong to this sign-in (nonce).")
        return claims


def _unverified(message: str) -> AuthenticationError:
    return AuthenticationError(
        message,
        reason="id_token_invalid",
        action="Start again from the EHR. If it keeps happening, contact your administrator.",
    )


def verify_response_issuer(returned: str | None, *, issuer: str | None, required: bool) -> None:
    """RFC 9207 mix-up defence on an authorization response.

    ``issuer`` is the authorization server's ``issuer`` from its discovery document, sealed into
    the state when the request was sent (usually *not* the FHIR base URL: Epic's is
    ``.../oauth2`` beside ``.../api/FHIR/R4``). A returned ``iss`` must equal it exactly (simple
    string comparison, RFC 9207 section 2.4); it must be present when the server advertises
    ``authorization_response_iss_parameter_supported``. ``AuthenticationError`` otherwise.
    """
    from connector_core.errors import AuthenticationError

    restart = "Start again from the EHR. If it keeps happening, contact your administrator."
    if returned is None or returned == "":
        if required:
            raise AuthenticationError(
                "This sign-in answer does not say which server issued it, although the EHR "
                "always does (RFC 9207): it may have been tampered with.",
                action=restart,
                reason="iss_missing",
            )
        return
    if issuer is None or not hmac.compare_digest(returned.encode(), issuer.encode()):
        raise AuthenticationError(
            "This sign-in answer came from another server than the one the sign-in was sent to.",
            action=restart,
            reason="iss_mismatch",
        )
