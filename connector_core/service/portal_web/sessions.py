"""Portal sessions: a sealed ``__Host-`` cookie over a server-side record, and CSRF tokens.

* The cookie ``__Host-vv-portal`` (``Secure; HttpOnly; SameSite=Lax; Path=/``, no ``Domain``)
  holds only ``seal({sid, seen})``: a random 128-bit session id and when the browser was last
  seen. Sealing (AES-GCM, :class:`~connector_core.crypto.Keyring`) makes it unforgeable, and it
  is renewed at most once a minute while the admin works.
* The record (table ``vv{region}portalsessions``, partition = keyed hash of the session id, row
  ``session``) holds, sealed as a whole: the verified caller (tenant, object id, UPN, roles) and
  msal's token cache with the refresh token for the Graph directory search. No token and no
  name ever reaches the browser, and the table holds no UPN in clear.
* Timeouts: idle 30 minutes (``seen``), absolute 8 hours from sign-in (the record's
  ``expires_at``). Sign-out deletes the record, so a copied cookie is dead at once.
* CSRF: every form carries ``keyed_hash("portal-csrf", sid)`` (synchronizer token, compared in
  constant time); state-changing requests also must not come from another site
  (``Sec-Fetch-Site`` / ``Origin``).

Records carry ``ExpiresAt`` (the absolute timeout) for the retention timer; a record found past
it is deleted on the spot.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from connector_core.crypto import Keyring
from connector_core.domain.models import Region
from connector_core.errors import AuthenticationError, NotFoundError
from connector_core.ports import EntityStore
from connector_core.repositories import table_name
from connector_core.service.portal_models import Caller

__all__ = [
    "ABSOLUTE_TIMEOUT",
    "IDLE_TIMEOUT",
    "SESSION_COOKIE",
    "SIGNIN_COOKIE",
    "PortalSession",
    "SessionLookup",
    "SessionStore",
    "clear_cookie",
    "csrf_token",
    "is_same_site",
    "valid_csrf",
]

SESSION_COOKIE = "__Host-vv-portal"
SIGNIN_COOKIE = "__Host-vv-portal-signin"
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=8)
RENEW_AFTER = timedelta(minutes=1)
SIGNIN_TTL_SECONDS = 600
COOKIE_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=Lax"
_COOKIE_PURPOSE = "portal-session-cookie"
_RECORD_PURPOSE = "portal-session-record"
_ROW = "session"
TABLE_KIND = "portalsessions"  # vv{region}portalsessions (the retention purge reads it too)
ROW_KEY = _ROW


@dataclass(frozen=True)
class PortalSession:
    sid: str
    caller: Caller
    created_at: datetime
    expires_at: datetime
    home_account_id: str | None
    token_cache: str | None
    etag: str


@dataclass(frozen=True)
class SessionLookup:
    """What the request's cookie leads to. ``expired``: there was a session, now gone (idle,
    absolute timeout, signed out elsewhere, or a cookie that does not unseal)."""

    session: PortalSession | None
    expired: bool = False
    set_cookie: str | None = None  # a renewed cookie, or one that clears a dead session


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def clear_cookie(name: str) -> str:
    return f"{name}=; Max-Age=0; {COOKIE_ATTRIBUTES}"


def csrf_token(keyring: Keyring, sid: str) -> str:
    return keyring.keyed_hash("portal-csrf", sid, length=64)


def valid_csrf(keyring: Keyring, session: PortalSession, submitted: str | None) -> bool:
    expected = csrf_token(keyring, session.sid)
    return hmac.compare_digest((submitted or "").encode(), expected.encode())


def is_same_site(headers: Any, public_url: str) -> bool:
    """A state-changing request from the portal's own pages. Fetch Metadata (every current
    browser sends it, and no page can forge it) must say ``same-origin``; without it, an
    ``Origin`` must be the portal's own (a client sending neither still needs the CSRF token)."""
    site = str(headers.get("sec-fetch-site", "") or "").strip().lower()
    if site:
        return site == "same-origin"
    origin = str(headers.get("origin", "") or "").strip()
    if not origin:
        return True
    own = urlsplit(public_url)
    return origin.rstrip("/").lower() == f"{own.scheme}://{own.netloc}".lower()


class SessionStore:
    def __init__(self, store: EntityStore, keyring: Keyring, *, region: Region) -> None:
        self._store = store
        self._keyring = keyring
        self._region = region
        self._table = table_name(region, TABLE_KIND)

    def _key(self, sid: str) -> str:
        return self._keyring.keyed_hash("portal-session-row", sid, length=64)

    def _entity(self, session: PortalSession) -> dict[str, Any]:
        caller = session.caller
        payload = {
            "sid": session.sid,
            "tid": caller.tenant_id,
            "oid": caller.object_id,
            "upn": caller.upn,
            "roles": sorted(caller.roles),
            "created": _epoch(session.created_at),
            "expires": _epoch(session.expires_at),
            "account": session.home_account_id,
            "cache": session.token_cache,
        }
        return {
            "PartitionKey": self._key(session.sid),
            "RowKey": _ROW,
            "Kind": "portalsession",
            "Region": self._region.value,
            "ExpiresAt": session.expires_at.astimezone(UTC).isoformat(),  # sorts as a time
            "Sealed": self._keyring.seal(_RECORD_PURPOSE, payload),
        }

    def create(
        self,
        *,
        caller: Caller,
        now: datetime,
        home_account_id: str | None,
        token_cache: str | None,
    ) -> PortalSession:
        session = PortalSession(
            sid=secrets.token_urlsafe(16),  # 128 random bits
            caller=caller,
            created_at=now,
            expires_at=now + ABSOLUTE_TIMEOUT,
            home_account_id=home_account_id,
            token_cache=token_cache,
            etag="",
        )
        etag = self._store.create_entity(self._table, self._entity(session))
        return replace(session, etag=etag)

    def get(self, sid: str) -> PortalSession | None:
        try:
            entity, etag = self._store.get_entity(self._table, self._key(sid), _ROW)
        except NotFoundError:
            return None
        if entity.get("Region") != self._region.value:
            return None
        try:
            body = self._keyring.unseal(_RECORD_PURPOSE, str(entity.get("Sealed", "")))
        except AuthenticationError:
            return None
        if body.get("sid") != sid:
            return None
        return PortalSession(
            sid=sid,
            caller=Caller(
                tenant_id=str(body["tid"]),
                object_id=body.get("oid"),
                upn=body.get("upn"),
                roles=frozenset(str(r) for r in body.get("roles") or ()),
            ),
            created_at=datetime.fromtimestamp(int(body["created"]), UTC),
            expires_at=datetime.fromtimestamp(int(body["expires"]), UTC),
            home_account_id=body.get("account"),
            token_cache=body.get("cache"),
            etag=etag,
        )

    def save_token_cache(self, session: PortalSession, token_cache: str) -> PortalSession:
        """Keep msal's refreshed cache; a concurrent refresh simply wins (both are valid)."""
        updated = replace(session, token_cache=token_cache)
        etag = self._store.upsert_entity(self._table, self._entity(updated))
        return replace(updated, etag=etag)

    def delete(self, sid: str) -> None:
        self._store.delete_entity(self._table, self._key(sid), _ROW)

    # --- the cookie -----------------------------------------------------------------------

    def cookie(self, session: PortalSession, *, now: datetime) -> str:
        value = self._keyring.seal(
            _COOKIE_PURPOSE,
            {"sid": session.sid, "seen": _epoch(now)},
            ttl_seconds=int(ABSOLUTE_TIMEOUT.total_seconds()),
        )
        max_age = int(ABSOLUTE_TIMEOUT.total_seconds())
        return f"{SESSION_COOKIE}={value}; Max-Age={max_age}; {COOKIE_ATTRIBUTES}"

    def lookup(self, cookie_value: str | None, *, now: datetime) -> SessionLookup:
        if not cookie_value:
            return SessionLookup(None)
        gone = SessionLookup(None, expired=True, set_cookie=clear_cookie(SESSION_COOKIE))
        try:
            body = self._keyring.unseal(_COOKIE_PURPOSE, cookie_value[:4096])
            sid, seen = str(body["sid"]), int(body["seen"])
        except (AuthenticationError, KeyError, TypeError, ValueError):
            return gone
        if now - datetime.fromtimestamp(seen, UTC) > IDLE_TIMEOUT:
            # This copy of the cookie is dead; a newer one (renewed since) may still be live.
            return gone
        session = self.get(sid)
        if session is None:
            return gone
        if now >= session.expires_at:
            self.delete(sid)
            return gone
        renewed = None
        if now - datetime.fromtimestamp(seen, UTC) >= RENEW_AFTER:
            renewed = self.cookie(session, now=now)
        return SessionLookup(session, set_cookie=renewed)
