"""Microsoft Graph: online meetings (createOrGet) and meeting call-event subscriptions.

App-only tokens come from msal client credentials per tenant (cached in memory by msal).
429 and 503 are retried honouring ``Retry-After`` (bounded); a 401 drops the cached token and
retries once. Failures become ``GraphError`` with ``extra["reason"]`` naming the known cases:

* ``application_access_policy``: 403 "No application access policy found for this app" - the
  tenant admin must grant the connector a Teams application access policy;
* ``user_not_found``: 404 for the organizer (the Entra user was deleted or is in another tenant);
* ``throttled``: still 429/503 after the retries.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from connector_core.errors import GraphError, SettingsError
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    import httpx

    from connector_core.adapters.entra_signin import MsalApps
    from connector_core.settings import Settings

__all__ = ["GraphClient", "OnlineMeeting", "notification_certificate"]

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
MAX_ATTEMPTS = 4
MAX_RETRY_WAIT = 10.0  # seconds; a longer Retry-After is not worth holding a browser for
_log = get_logger("graph")


@dataclass(frozen=True)
class OnlineMeeting:
    id: str
    join_web_url: str
    created: bool


def notification_certificate(pem: str) -> tuple[str, str]:
    """``(encryptionCertificate, encryptionCertificateId)`` for ``GRAPH_NOTIFICATION_CERT``:
    the certificate as base64 DER and its SHA-256 thumbprint (hex) as a stable id."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise SettingsError(
            "GRAPH_NOTIFICATION_CERT", "must start with a PEM certificate"
        ) from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode(), hashlib.sha256(der).hexdigest()


def _graph_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Graph sends 7 fractional digits; Python takes at most 6
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _retry_after(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("retry-after")
    wait: float | None = None
    if header:
        try:
            wait = float(header)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(header)
                wait = (when - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                wait = None
    if wait is None:
        wait = 0.5 * (2**attempt)
    return max(0.0, min(wait, MAX_RETRY_WAIT))


def _error_code(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
        error = body.get("error") or {}
        return str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, AttributeError):
        return "", ""


class GraphClient:
    def __init__(
        self,
        *,
        http: httpx.Client,
        settings: Settings,
        apps: MsalApps | None = None,
        token_provider: Callable[[str], str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._http = http
        self._settings = settings
        self._apps = apps
        self._token_provider = token_provider
        self._sleep = sleep
        self._base = settings.graph_base_url

    # --- tokens ------------------------------------------------------------------------------
    def _msal_apps(self) -> MsalApps:
        if self._apps is None:
            from connector_core.adapters.entra_signin import MsalApps

            self._apps = MsalApps(self._settings)
        return self._apps

    def _token(self, tenant_id: str) -> str:
        if self._token_provider is not None:
            return self._token_provider(tenant_id)
        app = self._msal_apps().app(tenant_id)
        result: dict[str, Any] = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
        token = result.get("access_token")
        if not isinstance(token, str):
            code = str(result.get("error") or "no token")[:40]
            log_event(_log, "graph.token_failed", tenant_id=tenant_id, error=code)
            raise GraphError(
                f"Microsoft Entra ID refused the connector an app-only Graph token ({code}).",
                reason="token",
                action="Ask your Microsoft 365 administrator to grant admin consent to the "
                "connector's application permissions (OnlineMeetings.ReadWrite.All).",
            )
        return token

    def _drop_token(self, tenant_id: str) -> None:
        if self._token_provider is not None or self._apps is None:
            return
        app = self._msal_apps().app(tenant_id)
        cache = app.token_cache
        for item in list(cache.search(cache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(item)

    # --- requests ----------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        tenant_id: str,
        json: dict[str, Any] | None = None,
        what: str,
    ) -> httpx.Response:
        import httpx

        url = f"{self._base}{path}"
        refreshed = False
        attempt = 0
        while True:
            headers = {
                "Authorization": f"Bearer {self._token(tenant_id)}",
                "Accept": "application/json",
            }
            try:
                response = self._http.request(method, url, json=json, headers=headers)
            except httpx.HTTPError:
                raise GraphError(f"Microsoft Graph could not be reached ({what}).") from None
            status = response.status_code
            if status in (429, 503) and attempt + 1 < MAX_ATTEMPTS:
                wait = _retry_after(response, attempt)
                log_event(
                    _log, "graph.retry", status=status, wait_s=round(wait, 2), attempt=attempt + 1
                )
                self._sleep(wait)
                attempt += 1
                continue
            if status == 401 and not refreshed:
                refreshed = True
                self._drop_token(tenant_id)
                continue
            return response

    def _fail(self, response: httpx.Response, what: str, tenant_id: str) -> GraphError:
        status = response.status_code
        code, message = _error_code(response)
        if status == 403 and "application access policy" in message.lower():
            log_event(
                _log,
                "graph.access_policy_missing",
                level=30,
                tenant_id=tenant_id,
                app_id=self._settings.entra_client_id,
                fix="Teams_PowerShell:_New-CsApplicationAccessPolicy_-Identity_VirtualVisits_"
                f"-AppIds_{self._settings.entra_client_id};_Grant-CsApplicationAccessPolicy_"
                "-PolicyName_VirtualVisits_-Global",
            )
            return GraphError(
                "Microsoft Teams does not allow the connector to create meetings for you: your "
                "organization has not granted it an application access policy.",
                reason="application_access_policy",
                graphStatus=status,
                action="Contact your Microsoft 365 administrator and ask them to grant the "
                "virtual-visit connector a Teams application access policy (the fix is in the "
                "connector's log under graph.access_policy_missing). Then start the visit again.",
            )
        if status == 404:
            return GraphError(
                f"Microsoft Graph did not find the user or resource ({what}).",
                reason="user_not_found" if "onlineMeetings" in what else "not_found",
                graphStatus=status,
            )
        if status in (429, 503):
            header = response.headers.get("retry-after", "")
            return GraphError(
                "Microsoft Teams is busy right now.",
                reason="throttled",
                graphStatus=status,
                # What Graph asked for (a queue retry waits at least this long).
                retryAfter=int(header) if header.isdigit() else None,
                action="Wait a minute and start the visit again from the EHR.",
            )
        log_event(_log, "graph.failed", what=what, status=status, code=code[:40] or "-")
        suffix = f" {code[:40]}" if code else ""
        return GraphError(
            f"Microsoft Graph refused the request ({what}, {status}{suffix}).",
            reason="failed",
            graphStatus=status,
        )

    # --- meetings ----------------------------------------------------------------------------
    def create_or_get_meeting(
        self,
        *,
        tenant_id: str,
        organizer_oid: str,
        external_id: str,
        subject: str,
        start: datetime,
        end: datetime,
    ) -> OnlineMeeting:
        body = {
            "externalId": external_id,
            "subject": subject,
            "startDateTime": _graph_time(start),
            "endDateTime": _graph_time(end),
            "lobbyBypassSettings": {"scope": "organizer", "isDialInBypassEnabled": False},
            "allowMeetingChat": "limited",  # chat only while the meeting is in progress
            "allowedPresenters": "organizer",
            "recordAutomatically": False,
        }
        path = f"/v1.0/users/{quote(organizer_oid, safe='')}/onlineMeetings/createOrGet"
        what = "onlineMeetings createOrGet"
        response = self._request("POST", path, tenant_id=tenant_id, json=body, what=what)
        if response.status_code not in (200, 201):
            raise self._fail(response, what, tenant_id)
        data = response.json()
        meeting_id, join = data.get("id"), data.get("joinWebUrl") or data.get("joinUrl")
        if not isinstance(meeting_id, str) or not isinstance(join, str):
            raise GraphError("Microsoft Graph answered createOrGet without a meeting.")
        return OnlineMeeting(id=meeting_id, join_web_url=join, created=response.status_code == 201)

    # --- subscriptions -----------------------------------------------------------------------
    @cached_property
    def _certificate(self) -> tuple[str, str]:
        return notification_certificate(self._settings.graph_notification_cert.get_secret_value())

    def create_subscription(
        self, *, tenant_id: str, join_web_url: str, client_state: str, expires_at: datetime
    ) -> tuple[str, datetime]:
        cert, cert_id = self._certificate
        public = self._settings.public_url
        body = {
            "changeType": "updated",
            "notificationUrl": f"{public}/api/presence",
            "lifecycleNotificationUrl": f"{public}/api/presence/lifecycle",
            "resource": f"communications/onlineMeetings/?$filter=JoinWebUrl eq '{join_web_url}'",
            "includeResourceData": True,
            "encryptionCertificate": cert,
            "encryptionCertificateId": cert_id,
            "expirationDateTime": _graph_time(expires_at),
            "clientState": client_state,
            "latestSupportedTlsVersion": "v1_2",
        }
        what = "subscription create"
        response = self._request(
            "POST", "/beta/subscriptions", tenant_id=tenant_id, json=body, what=what
        )
        if response.status_code != 201:
            raise self._fail(response, what, tenant_id)
        data = response.json()
        sub_id = data.get("id")
        if not isinstance(sub_id, str):
            raise GraphError("Microsoft Graph created a subscription without an id.")
        return sub_id, _parse_time(data.get("expirationDateTime")) or expires_at

    def renew_subscription(
        self, *, tenant_id: str, subscription_id: str, expires_at: datetime
    ) -> datetime:
        what = "subscription renew"
        response = self._request(
            "PATCH",
            f"/beta/subscriptions/{quote(subscription_id, safe='')}",
            tenant_id=tenant_id,
            json={"expirationDateTime": _graph_time(expires_at)},
            what=what,
        )
        if response.status_code != 200:
            raise self._fail(response, what, tenant_id)
        return _parse_time(response.json().get("expirationDateTime")) or expires_at

    def reauthorize_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        what = "subscription reauthorize"
        response = self._request(
            "POST",
            f"/beta/subscriptions/{quote(subscription_id, safe='')}/reauthorize",
            tenant_id=tenant_id,
            what=what,
        )
        if response.status_code not in (200, 202, 204):
            raise self._fail(response, what, tenant_id)

    def delete_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        what = "subscription delete"
        response = self._request(
            "DELETE",
            f"/beta/subscriptions/{quote(subscription_id, safe='')}",
            tenant_id=tenant_id,
            what=what,
        )
        if response.status_code not in (200, 204, 404):
            raise self._fail(response, what, tenant_id)
