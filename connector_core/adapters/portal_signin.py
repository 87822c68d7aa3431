"""Microsoft Entra ID sign-in of the configuration portal's staff (msal confidential client).

The portal is a backend-for-frontend: msal runs the authorization code flow with PKCE and nonce
(msal generates and checks both) against the multi-tenant authority
``{ENTRA_AUTHORITY_HOST}/organizations`` and asks for the connector's own API scope
(``{ENTRA_API_AUDIENCE}/Connector.Use``), so the access token it gets is exactly what the JSON
API accepts and is validated by the same code. Each session has its own msal token cache
(``SerializableTokenCache``): it holds the refresh token that later buys a delegated Graph token
(``User.ReadBasic.All``) for the approver picker. The caller keeps that cache sealed on the
server side; no token ever reaches the browser.

An msal app is built per call around the session's cache (msal's own web-app pattern); the
authority's discovery documents are kept in one per-process ``http_cache``, so that costs no
network round trip once warm.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connector_core.errors import AuthenticationError, DependencyError, SettingsError

if TYPE_CHECKING:
    from connector_core.settings import Settings

__all__ = ["GRAPH_DIRECTORY_SCOPE", "PORTAL_API_SCOPE", "PortalSignIn", "PortalTokens"]

PORTAL_API_SCOPE = "Connector.Use"  # the delegated scope the app registration exposes
GRAPH_DIRECTORY_SCOPE = "https://graph.microsoft.com/User.ReadBasic.All"
_SIGNIN_AUTHORITY = "organizations"  # any work account; the tenant check comes after
_FLOW_KEYS = ("state", "redirect_uri", "scope", "code_verifier", "nonce", "claims_challenge")
_RESTART = "Sign in to the configuration portal again."


@dataclass(frozen=True)
class PortalTokens:
    """What a completed sign-in yields: the API access token (validated by the caller), the
    account msal knows the user by, and the session's serialized token cache."""

    access_token: str
    home_account_id: str
    tenant_id: str
    token_cache: str


class _HttpCache(dict[Any, Any]):
    """msal's ``http_cache`` (authority discovery), shared by the per-session apps."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def __setitem__(self, key: Any, value: Any) -> None:
        with self.lock:
            super().__setitem__(key, value)


class PortalSignIn:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http_cache = _HttpCache()

    @property
    def api_scope(self) -> str:
        return f"{self._settings.api_audience}/{PORTAL_API_SCOPE}"

    def _app(self, tenant: str, cache: Any | None = None) -> Any:
        import msal

        from connector_core.adapters.entra_signin import client_credential

        settings = self._settings
        if not settings.entra_client_id:
            raise SettingsError("ENTRA_CLIENT_ID", "missing")
        try:
            return msal.ConfidentialClientApplication(
                settings.entra_client_id,
                client_credential=client_credential(settings),
                authority=f"{settings.entra_authority_host}/{tenant}",
                instance_discovery=settings.entra_instance_discovery,
                token_cache=cache,
                http_cache=self._http_cache,
            )
        except ValueError:
            raise DependencyError(
                "Microsoft Entra ID could not be reached to sign you in.", action=_RESTART
            ) from None
        except OSError:
            raise DependencyError("Microsoft Entra ID could not be reached.") from None

    def start(
        self, *, redirect_uri: str, login_hint: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``(authorize URL, flow)``: send the browser to the URL, keep the flow sealed."""
        app = self._app(_SIGNIN_AUTHORITY)
        with warnings.catch_warnings():
            # Query response mode on purpose: a cross-site form POST from Entra would not carry
            # the SameSite=Lax cookie that binds the sign-in to this browser.
            warnings.filterwarnings("ignore", message=".*response_mode.*", category=UserWarning)
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                scopes=[self.api_scope],
                redirect_uri=redirect_uri,
                login_hint=login_hint,
                prompt="select_account",
            )
        if "error" in flow or "auth_uri" not in flow:
            raise DependencyError("The Microsoft sign-in could not be started.")
        url = str(flow["auth_uri"])
        if "\r" in url or "\n" in url:
            raise DependencyError("The Microsoft sign-in URL is malformed.")
        return url, {k: flow[k] for k in _FLOW_KEYS if k in flow}

    def complete(self, *, flow: dict[str, Any], auth_response: dict[str, str]) -> PortalTokens:
        """Redeem the code; ``AuthenticationError`` if Entra or the answer is not right."""
        import msal

        cache = msal.SerializableTokenCache()
        app = self._app(_SIGNIN_AUTHORITY, cache)
        result = self._msal_call(
            lambda: app.acquire_token_by_auth_code_flow(dict(flow), dict(auth_response))
        )
        if "error" in result:
            code = str(result.get("error"))[:40]
            raise AuthenticationError(
                f"Microsoft sign-in did not complete ({code}).",
                action="Sign in again with your work account. If your account is disabled, "
                "contact your administrator.",
                entraError=code,
            )
        claims = result.get("id_token_claims") or {}
        tid, oid = claims.get("tid"), claims.get("oid")
        token = result.get("access_token")
        if not all(isinstance(v, str) and v for v in (tid, oid, token)):
            raise AuthenticationError("The Microsoft sign-in did not identify a work account.")
        accounts = app.get_accounts()
        if not accounts:
            raise AuthenticationError("The Microsoft sign-in did not identify a work account.")
        return PortalTokens(
            access_token=str(token),
            home_account_id=str(accounts[0]["home_account_id"]),
            tenant_id=str(tid).lower(),
            token_cache=cache.serialize(),
        )

    def graph_token(
        self, *, tenant_id: str, home_account_id: str, token_cache: str
    ) -> tuple[str, str | None]:
        """A delegated Graph token (``User.ReadBasic.All``) for the signed-in user, from the
        session's cache (refreshed by msal when needed): ``(token, new cache or None)``."""
        import msal

        cache = msal.SerializableTokenCache()
        cache.deserialize(token_cache)
        app = self._app(tenant_id, cache)
        account = next(
            (a for a in app.get_accounts() if a.get("home_account_id") == home_account_id), None
        )
        if account is None:
            raise AuthenticationError("Your portal session has no Microsoft account.")
        result = self._msal_call(
            lambda: app.acquire_token_silent([GRAPH_DIRECTORY_SCOPE], account=account)
        )
        if not result or "access_token" not in result:
            raise AuthenticationError(
                "Microsoft Entra ID did not renew your sign-in for the directory search.",
                action=_RESTART,
            )
        return str(result["access_token"]), cache.serialize() if cache.has_state_changed else None

    @staticmethod
    def _msal_call(call: Any) -> dict[str, Any]:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*response_mode.*", category=UserWarning)
                result: dict[str, Any] = call() or {}
                return result
        except ValueError:
            # msal: state mismatch, missing code, or an answer that is not for this flow.
            raise AuthenticationError(
                "The Microsoft sign-in answer does not belong to this sign-in.", action=_RESTART
            ) from None
        except OSError:
            raise DependencyError(
                "Microsoft Entra ID could not be reached to complete the sign-in.",
                action=_RESTART,
            ) from None
        except Exception as error:
            from msal.exceptions import MsalError

            if not isinstance(error, MsalError):
                raise
            raise DependencyError(
                "Microsoft Entra ID failed while completing the sign-in.", action=_RESTART
            ) from None
