"""The clinician's visit cookie ``__Host-vv-visit``: the visits this browser opened from the EHR.

A provider launch adds its visit; the visit page, its event stream and ``/participants``
accept any visit in it. It holds the ``MAX_VISITS`` most recent visits, newest first, each with
its own expiry (``VISIT_TTL_SECONDS`` after its launch), so a clinician who opens a second visit
keeps the first one's page. Sealed (purpose ``visit-cookie``) as
``{"role": "provider", "visits": [[visit key, expiry (Unix seconds)], ...]}``; a cookie of the
single-visit format (``{"visit_key": ..., "role": ...}``, sealed before) reads as that one visit
until its own expiry. Size: 8 visits of the longest key (64 hex) seal to under 1.2 KB, far
below the 4 KB browsers keep per cookie (tests/unit/test_visit_cookie.py).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from connector_core.errors import AuthenticationError

if TYPE_CHECKING:
    from connector_core.crypto import Keyring

__all__ = [
    "MAX_VISITS",
    "VISIT_COOKIE",
    "VISIT_KEY",
    "VISIT_TTL_SECONDS",
    "add_visit",
    "cookie_visits",
]

VISIT_COOKIE = "__Host-vv-visit"
VISIT_TTL_SECONDS = 12 * 3600
MAX_VISITS = 8  # bounded: the oldest visit leaves when a ninth is opened
_PURPOSE = "visit-cookie"
_ROLES = ("provider", "clinician")
VISIT_KEY = re.compile(r"^[0-9a-f]{16,64}$")  # a visit key as stored (hex HMAC)


def _entries(payload: dict[str, Any], now: int) -> list[tuple[str, int]]:
    """``(visit key, expiry)`` of every visit still valid, newest first, without duplicates."""
    if payload.get("role", "provider") not in _ROLES:
        return []
    sealed_until = payload.get("_exp")
    fallback = sealed_until if isinstance(sealed_until, int) else now + VISIT_TTL_SECONDS
    raw = payload.get("visits")
    if not isinstance(raw, list):  # the single-visit format
        raw = [payload.get("visit_key")]
    found: dict[str, int] = {}
    for item in raw:
        key, expires = item, fallback
        if isinstance(item, list) and len(item) == 2:
            key, expires = item
        if not isinstance(key, str) or not VISIT_KEY.match(key) or not isinstance(expires, int):
            continue
        if expires > now and key not in found:
            found[key] = expires
    return list(found.items())


def cookie_visits(
    keyring: Keyring, sealed: str, *, now: float | None = None
) -> list[tuple[str, int]]:
    """The visits the cookie authorizes, newest first; ``AuthenticationError`` when it is not
    genuine or has expired as a whole. Times are the keyring's (wall clock, Unix seconds)."""
    now = time.time() if now is None else now
    try:
        payload = keyring.unseal(_PURPOSE, sealed, now=now)
    except AuthenticationError:
        raise AuthenticationError(
            "Your visit session has expired; open the visit again from the EHR."
        ) from None
    return _entries(payload, int(now))


def add_visit(
    keyring: Keyring, previous: str | None, visit_key: str, *, now: float | None = None
) -> tuple[str, int]:
    """The cookie's new value and max-age after a launch of ``visit_key``: it first, then the
    still-valid visits of ``previous`` (a cookie that does not open is started afresh)."""
    now = time.time() if now is None else now
    kept: list[tuple[str, int]] = []
    if previous:
        try:
            kept = cookie_visits(keyring, previous, now=now)
        except AuthenticationError:
            kept = []
    expires = int(now) + VISIT_TTL_SECONDS
    visits = [(visit_key, expires), *((k, e) for k, e in kept if k != visit_key)][:MAX_VISITS]
    sealed = keyring.seal(
        _PURPOSE,
        {"role": "provider", "visits": [[k, e] for k, e in visits]},
        ttl_seconds=VISIT_TTL_SECONDS,  # the newest visit's expiry: none outlives it
    )
    return sealed, VISIT_TTL_SECONDS
