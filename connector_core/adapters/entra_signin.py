"""Microsoft Entra ID through msal: the clinician's one-time sign-in and app-only Graph tokens.

One msal ``ConfidentialClientApplication`` per tenant (authority ``{ENTRA_AUTHORITY_HOST}/{tid}``)
is built on first use and kept for the process: msal caches app-only tokens in memory and the
authority's discovery happens once. ``instance_discovery`` is off for authority hosts that are not
Microsoft clouds (the sandbox), as msal would otherwise ask login.microsoftonline.com about them.

Sign-in is the authorization code flow with PKCE and nonce (msal generates and checks both). The
flow dict msal returns is kept by the caller (sealed, in a browser cookie), never in a table.
The answer comes back as a GET (query response mode; msal warns that it prefers form_post, a
warning silenced here on purpose): a cross-site form POST from Entra would not carry the
SameSite=Lax cookie that binds the sign-in to the browser.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connector_core.errors import AuthenticationError, DependencyError, SettingsError

if TYPE_CHECKING:
    from connector_core.settings import Settings

__all__ = ["EntraSignIn", "EntraUser", "MsalApps", "client_credential"]

# Fields of msal's flow dict needed to complete it (auth_uri is only for the redirect).
_FLOW_KEYS = ("state", "redirect_uri", "scope", "code_verifier", "nonce", "claims_challenge")


@dataclass(frozen=True)
class EntraUser:
    """Who signed in: object id and tenant id only (names are never kept)."""

    oid: str
    tid: str


def client_credential(settings: Settings) -> Any:
    """msal's ``client_credential``: the secret, else the certificate (PEM) and its thumbprint."""
    if settings.entra_client_secret is not None:
        return settings.entra_client_secret.get_secret_value()
    if settings.entra_client_certificate is None:
        raise SettingsError("ENTRA_CLIENT_SECRET", "missing")
    pem = settings.entra_client_certificate.get_secret_value()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise SettingsError(
            "ENTRA_CLIENT_CERTIFICATE", "must be a PEM certificate and its PEM private key"
        ) from None
    return {
        "private_key": pem,
        "thumbprint": cert.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - Entra's x5t
        "public_certificate": pem,
    }


class MsalApps:
    """msal confidential client apps, one per tenant, built once (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._apps: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _credential(self) -> Any:
        return client_credential(self._settings)

    def app(self, tenant_id: str) -> Any:
        app = self._apps.get(tenant_id)
        if app is not None:
            return app
        with self._lock:
            app = self._apps.get(tenant_id)
            if app is None:
                import msal

                settings = self._settings
                try:
                    app = msal.ConfidentialClientApplication(
                        settings.entra_client_id,
                        client_credential=self._credential(),
                        authority=f"{settings.entra_authority_host}/{tenant_id}",
                        instance_discovery=settings.entra_instance_discovery,
                    )
                except ValueError:
                    raise DependencyError(
                        "Microsoft Entra ID does not know this tenant, or could not be reached.",
                        action="Check the tenant of the connector configuration.",
                    ) from None
                except OSError:
                    raise DependencyError("Microsoft Entra ID could not be reached.") from None
                self._apps[tenant_id] = app
            return app

    def forget(self, tenant_id: str) -> None:
        with self._lock:
            self._apps.pop(tenant_id, None)


class EntraSignIn:
    """Interactive sign-in (authorization code + PKCE) of a clinician into their tenant."""

    def __init__(self, settings: Settings, *, apps: MsalApps | None = None) -> None:
        self._settings = settings
        self._apps = apps or MsalApps(settings)

    def start(
        self, *, tenant_id: str, redirect_uri: str, login_hint: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``(authorize URL, flow)``: send the browser to the URL, keep the flow (sealed)."""
        app = self._apps.app(tenant_id)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*response_mode.*", category=UserWarning)
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                scopes=[],  # openid profile (msal adds them): identity only, no API access
                redirect_uri=redirect_uri,
                login_hint=login_hint,
            )
        if "error" in flow or "auth_uri" not in flow:
            raise DependencyError("The Microsoft sign-in could not be started.")
        url = str(flow["auth_uri"])
        if "\r" in url or "\n" in url:
            raise DependencyError("The Microsoft sign-in URL is malformed.")
        return url, {k: flow[k] for k in _FLOW_KEYS if k in flow}

    def complete(
        self, *, tenant_id: str, flow: dict[str, Any], auth_response: dict[str, str]
    ) -> EntraUser:
        """Redeem the code; ``AuthenticationError`` if Entra or the response is not right."""
        app = self._apps.app(tenant_id)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*response_mode.*", category=UserWarning)
                result: dict[str, Any] = app.acquire_token_by_auth_code_flow(
                    dict(flow), dict(auth_response)
                )
        except ValueError:
            # msal: state mismatch, missing code, or a response that is not for this flow.
            raise AuthenticationError(
                "The Microsoft sign-in answer does not belong to this sign-in.",
                action="Start the visit again from the EHR.",
            ) from None
        except OSError:  # requests' connection errors and timeouts
            raise DependencyError(
                "Microsoft Entra ID could not be reached to complete the sign-in.",
                action="Start the visit again from the EHR in a moment.",
            ) from None
        except Exception as error:
            from msal.exceptions import MsalError

            if not isinstance(error, MsalError):
                raise
            # msal raises MsalServiceError when the token endpoint answers an HTTP error
            # (Entra 5xx) instead of an OAuth error body.
            raise DependencyError(
                "Microsoft Entra ID failed while completing the sign-in.",
                action="Start the visit again from the EHR in a moment.",
            ) from None
        if "error" in result:
            code = str(result.get("error"))[:40]
            raise AuthenticationError(
                f"Microsoft sign-in did not complete ({code}).",
                action="Start the visit again from the EHR and sign in with your work account. "
                "If your account is disabled or not in your organization's directory, contact "
                "your administrator.",
                entraError=code,
            )
        claims = result.get("id_token_claims") or {}
        oid, tid = claims.get("oid"), claims.get("tid")
        if not isinstance(oid, str) or not isinstance(tid, str) or not oid or not tid:
            raise AuthenticationError("The Microsoft sign-in did not identify a work account.")
        return EntraUser(oid=oid.lower(), tid=tid.lower())
