"""Microsoft Graph / Teams stand-in (plain HTTP): online meetings, subscriptions, a meeting page,
and meeting call event notifications delivered to the subscriber's webhook.

API (bearer token from :class:`~devtools.sandbox.entra.SandboxEntra` client credentials, ``aud``
https://graph.microsoft.com, verified in process against the Entra stand-in's keys)::

    POST   /v1.0/users/{organizerOid}/onlineMeetings/createOrGet     201 new, 200 existing
    GET    /v1.0/users/{organizerOid}/onlineMeetings/{meetingId}
    POST   /{v1.0|beta}/subscriptions                                 validation handshake first
    GET    /{v1.0|beta}/subscriptions[/{id}]
    PATCH  /{v1.0|beta}/subscriptions/{id}                            renew (expirationDateTime)
    DELETE /{v1.0|beta}/subscriptions/{id}
    POST   /{v1.0|beta}/subscriptions/{id}/reauthorize
    GET    /{v1.0|beta}/users?$search="displayName:..."   directory search (delegated token with
                                                          User.ReadBasic.All, or app User.Read.All)
    GET    /{v1.0|beta}/users?$filter=id in ('..','..')    users by object id (up to 15)
    POST   /{v1.0|beta}/$batch                                JSON batching, up to 20 requests
                                                          (GET /users only); answers in reverse

Meeting page (what a person opens): each ``joinWebUrl`` is
``{graph_url}/l/meetup-join/19%3ameeting_{thread}%40thread.v2/0?context={"Tid","Oid"}`` like
Teams's own links; ``&anon=true`` goes straight to the browser-guest flow. Guests wait in the lobby
until someone in the meeting admits them (lobby bypass per ``lobbyBypassSettings``).

Notifications follow "Get change notifications for Microsoft Teams meeting call updates": one
item per subscription and event (``Microsoft.Communication.CallStarted``, ``CallEnded``,
``CallRosterUpdate`` with ``activeParticipants@joined`` / ``activeParticipants@exited``, identity
sets in PascalCase: ``{"User": {"Id", "DisplayName", "TenantId"}}``, ``{"Guest": {"Id",
"DisplayName"}}``, ``{"AzureCommunicationServicesUser": {...}}``). Lobby entries produce no event
(as in Teams: people in the lobby are not in the call roster); admitting someone does. With
``includeResourceData`` the event is encrypted (see :mod:`devtools.sandbox._notify`) and the body
carries ``validationTokens``; otherwise its properties are in ``resourceData``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import html
import json
import queue
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote, urlencode

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from devtools.sandbox._notify import (
    RichNotificationError,
    certificate_thumbprint,
    decrypt_rich_notification,
    encrypt_rich_notification,
    load_encryption_certificate,
)
from devtools.sandbox.entra import GRAPH_APP_ID, GRAPH_AUDIENCE, SandboxEntra

__all__ = [
    "MAX_SUBSCRIPTION_MINUTES",
    "Delivery",
    "Meeting",
    "Participant",
    "RichNotificationError",
    "SandboxGraph",
    "Subscription",
    "decrypt_rich_notification",
    "encrypt_rich_notification",
]

# Documented as "3 days" for meeting call events; Graph's hard limit is slightly under that and
# its error says 4230 minutes, so we enforce 4230 (a connector within it is within the real one).
MAX_SUBSCRIPTION_MINUTES = 4230
VALIDATION_TIMEOUT = 10.0
Role = Literal["organizer", "staff", "guest"]
ParticipantState = Literal["lobby", "in_meeting", "left"]
IdentityKind = Literal["user", "guest", "acs"]
_MEETING_RESOURCE = re.compile(
    r"^/?communications/onlinemeetings/?\?\$filter=joinweburl\s+eq\s+'(?P<url>.+)'$",
    re.IGNORECASE,
)
_MEETING_RESOURCE_V2 = re.compile(
    r"^/?communications/onlinemeetings\(joinweburl='(?P<url>.+)'\)/meetingcallevents$",
    re.IGNORECASE,
)
_READ_ROLES = {"OnlineMeetings.Read.All", "OnlineMeetings.ReadWrite.All"}
_WRITE_ROLES = {"OnlineMeetings.ReadWrite.All"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _graph_time(value: dt.datetime) -> str:
    """Graph's 7-digit fractional seconds, e.g. 2024-05-01T10:00:00.1234560Z."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def _parse_time(value: str) -> dt.datetime:
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", text)
    if match:  # Python wants at most 6 fractional digits
        frac = (match.group(2) or "")[:7]
        text = match.group(1) + frac + (match.group(3) or "")
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


# --- records ------------------------------------------------------------------------------------


@dataclass
class Participant:
    id: str
    role: Role
    display_name: str
    identity_kind: IdentityKind
    oid: str | None = None  # Entra users (organizer, staff)
    tid: str | None = None
    state: ParticipantState = "lobby"
    joined_at: dt.datetime | None = None  # entered the call (after the lobby)
    left_at: dt.datetime | None = None
    acs_id: str | None = None

    def identity(self) -> dict[str, Any]:
        """communicationsIdentitySet in the PascalCase of meeting call events."""
        if self.identity_kind == "user":
            return {
                "User": {"Id": self.oid, "DisplayName": self.display_name, "TenantId": self.tid}
            }
        if self.identity_kind == "acs":
            return {
                "AzureCommunicationServicesUser": {
                    "AzureCommunicationServicesResourceId": "sandbox-acs-resource",
                    "Id": self.acs_id,
                    "DisplayName": self.display_name,
                }
            }
        return {"Guest": {"Id": self.id, "DisplayName": self.display_name}}

    def roster_entry(self) -> dict[str, Any]:
        return {"id": self.id, "identity": self.identity()}


@dataclass
class Meeting:
    id: str
    tid: str
    organizer_oid: str
    external_id: str
    thread_id: str
    join_web_url: str
    subject: str
    start: dt.datetime
    end: dt.datetime
    created: dt.datetime
    lobby_bypass: dict[str, Any]
    allow_meeting_chat: str
    request: dict[str, Any]
    meeting_code: str
    participants: dict[str, Participant] = field(default_factory=dict)
    call_active: bool = False
    last_event: dt.datetime | None = None

    def in_call(self) -> list[Participant]:
        return [p for p in self.participants.values() if p.state == "in_meeting"]

    def in_lobby(self) -> list[Participant]:
        return [p for p in self.participants.values() if p.state == "lobby"]

    @property
    def resource_id(self) -> str:
        return f"communications/onlineMeetings?$filter=joinWebUrl+eq+'{self.join_web_url}'"


@dataclass
class Subscription:
    id: str
    tid: str
    application_id: str
    creator_id: str
    resource: str
    change_type: str
    notification_url: str
    lifecycle_notification_url: str | None
    expiration: dt.datetime
    client_state: str | None
    include_resource_data: bool
    encryption_certificate: str | None
    encryption_certificate_id: str | None
    certificate: x509.Certificate | None
    meeting_id: str
    api_version: str
    latest_supported_tls_version: str = "v1_2"
    created: dt.datetime = field(default_factory=_now)
    deleted: bool = False
    removed: bool = False  # by a subscriptionRemoved lifecycle event
    reauthorized_at: dt.datetime | None = None
    renewals: int = 0

    @property
    def active(self) -> bool:
        return not (self.deleted or self.removed) and self.expiration > _now()

    def to_json(self, graph_url: str) -> dict[str, Any]:
        return {
            "@odata.context": f"{graph_url}/{self.api_version}/$metadata#subscriptions/$entity",
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.application_id,
            "changeType": self.change_type,
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "notificationQueryOptions": None,
            "lifecycleNotificationUrl": self.lifecycle_notification_url,
            "expirationDateTime": _graph_time(self.expiration),
            "creatorId": self.creator_id,
            "includeResourceData": self.include_resource_data,
            "latestSupportedTlsVersion": self.latest_supported_tls_version,
            "encryptionCertificate": self.encryption_certificate,
            "encryptionCertificateId": self.encryption_certificate_id,
            "notificationUrlAppId": None,
        }


@dataclass
class Delivery:
    """One POST Graph made (or tried) to a subscriber: validation, notification or lifecycle."""

    kind: Literal["validation", "notification", "lifecycle", "raw"]
    url: str
    subscription_id: str | None
    body: Any  # JSON sent (None for validation requests)
    event: dict[str, Any] | None = None  # the plaintext meeting event (before encryption)
    status: int | None = None  # last HTTP status (None: connection error)
    attempts: int = 0
    latency_ms: float | None = None  # of the last attempt
    error: str | None = None
    done: bool = False
    created: dt.datetime = field(default_factory=_now)
    response_text: str | None = None
    validation_token: str | None = None  # the (decoded) token of a validation request

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def slow(self) -> bool:
        """Graph expects an answer within 3 s; slower endpoints get throttled and dropped."""
        return self.latency_ms is not None and self.latency_ms > 3000

    @property
    def event_type(self) -> str | None:
        return None if self.event is None else str(self.event.get("eventType"))


# --- errors -------------------------------------------------------------------------------------


def _graph_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    request_id = str(uuid.uuid4())
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": _now().strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": request_id,
            },
        }
    }
    all_headers = {"request-id": request_id, "client-request-id": request_id}
    all_headers.update(headers or {})
    return JSONResponse(body, status_code=status, headers=all_headers)


_FAULT_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "Forbidden",
    404: "ResourceNotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


@dataclass
class _Fault:
    path_substring: str
    status: int
    retry_after: float | None
    remaining: int


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- the stand-in -------------------------------------------------------------------------------


class SandboxGraph:
    """Graph/Teams stand-in. ``app`` is the Starlette app; call :meth:`set_base_url` once served."""

    def __init__(
        self,
        *,
        entra: SandboxEntra,
        base_url: str = "",
        retry_delays: Iterable[float] = (0.25, 0.5, 1.0),
        delivery_timeout: float = 10.0,
        max_subscription_minutes: int = MAX_SUBSCRIPTION_MINUTES,
    ) -> None:
        self.entra = entra
        self._base_url = base_url.rstrip("/")
        self.retry_delays = tuple(retry_delays)
        self.delivery_timeout = delivery_timeout
        self.max_subscription_minutes = max_subscription_minutes
        self.meetings: dict[str, Meeting] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.deliveries: list[Delivery] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of API calls
        self._by_external: dict[tuple[str, str, str], str] = {}
        self._by_thread: dict[str, str] = {}
        self._policies: dict[str, bool] = {}
        self._faults: list[_Fault] = []
        self._duplicate = 0
        self._reorder_armed = False
        self._early_join: tuple[Role, str | None] | None = None
        self._held: Delivery | None = None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._pending = 0
        self._worker: threading.Thread | None = None
        self._client: httpx.Client | None = None
        self.app = Starlette(routes=self._routes())

    # --- lifecycle ----------------------------------------------------------------------------

    def set_base_url(self, url: str) -> None:
        self._base_url = url.rstrip("/")

    @property
    def url(self) -> str:
        """GRAPH_BASE_URL (``/v1.0`` and ``/beta`` are appended by clients)."""
        return self._base_url

    def start_delivery(self) -> None:
        """Start the background notification sender (idempotent; done lazily on first use)."""
        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                return
            self._client = httpx.Client(timeout=self.delivery_timeout, trust_env=True)
            self._worker = threading.Thread(
                target=self._deliver_loop, name="graph-notify", daemon=True
            )
            self._worker.start()

    def close(self) -> None:
        """Stop the sender (pending deliveries are dropped)."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(None)
            worker.join(5)
        self._worker = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- test hooks ---------------------------------------------------------------------------

    def set_access_policy(self, tid_or_oid: str, allowed: bool) -> None:
        """Application access policy for online meetings, for a tenant (global grant) or one user
        (a user grant wins over the tenant's). Default: allowed. Denied -> 403 with Graph's body."""
        with self._lock:
            self._policies[tid_or_oid] = allowed

    def fail_next(
        self,
        path_substring: str,
        status: int = 429,
        count: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """The next ``count`` API requests whose path contains ``path_substring`` answer
        ``status`` with Graph's error JSON (and ``Retry-After`` when given; 429/503 default 1)."""
        if retry_after is None and status in (429, 503):
            retry_after = 1
        with self._lock:
            self._faults.append(_Fault(path_substring, status, retry_after, count))

    def join_during_next_create(
        self, role: Role = "guest", *, external_id: str | None = None
    ) -> None:
        """At the next subscription create, someone joins the meeting after the subscription
        exists but before Graph answers the create, and the notification is delivered before
        the answer: the subscriber sees an event for a subscription id it has not been told
        yet (Microsoft Graph gives no ordering guarantee between the two)."""
        with self._lock:
            self._early_join = (role, external_id)  # only that meeting's, when given

    def _join_and_wait_delivered(self, subscription_id: str, meeting_id: str, role: Role) -> None:
        with self._cond:
            before = len(self.deliveries)
        self.join(meeting_id, role)
        deadline = time.monotonic() + 15
        with self._cond:
            while time.monotonic() < deadline:
                mine = [
                    d
                    for d in self.deliveries[before:]
                    if d.subscription_id == subscription_id and d.kind == "notification"
                ]
                if mine and all(d.done for d in mine):
                    return
                self._cond.wait(0.1)

    def duplicate_next(self, count: int = 1) -> None:
        """Deliver each of the next ``count`` change notifications twice (at-least-once)."""
        with self._lock:
            self._duplicate += count

    def reorder_next(self) -> None:
        """Hold the next change notification and send it after the one that follows it."""
        with self._lock:
            self._reorder_armed = True

    reorder = reorder_next

    def release_held(self) -> None:
        """Send a notification held by :meth:`reorder_next` (if nothing followed it)."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            self._enqueue(held)

    def send_raw(self, subscription_id: str, payload: Any, *, lifecycle: bool = False) -> Delivery:
        """POST ``payload`` as-is to the subscription's notificationUrl (or lifecycle URL)."""
        sub = self.subscriptions[subscription_id]
        url = sub.lifecycle_notification_url if lifecycle else sub.notification_url
        if url is None:
            raise ValueError("subscription has no lifecycleNotificationUrl")
        delivery = Delivery(kind="raw", url=url, subscription_id=sub.id, body=payload)
        self._enqueue(delivery)
        return delivery

    def send_lifecycle(
        self,
        subscription_id: str,
        event: Literal["reauthorizationRequired", "subscriptionRemoved", "missed"],
    ) -> Delivery:
        """A lifecycle notification to the subscription's lifecycleNotificationUrl.
        ``subscriptionRemoved`` also stops the subscription's change notifications."""
        sub = self.subscriptions[subscription_id]
        if sub.lifecycle_notification_url is None:
            raise ValueError("subscription has no lifecycleNotificationUrl")
        if event == "subscriptionRemoved":
            with self._lock:
                sub.removed = True
        item = {
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": _graph_time(sub.expiration),
            "tenantId": sub.tid,
            "organizationId": sub.tid,
            "clientState": sub.client_state,
            "lifecycleEvent": event,
            "resource": sub.resource,
        }
        delivery = Delivery(
            kind="lifecycle",
            url=sub.lifecycle_notification_url,
            subscription_id=sub.id,
            body={"value": [item]},
        )
        self._enqueue(delivery)
        return delivery

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every queued delivery finished (including retries)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._pending} deliveries still pending")
                self._cond.wait(left)

    def wait_for(
        self,
        predicate: Callable[[Delivery], bool],
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[Delivery]:
        """Wait until ``count`` finished deliveries match ``predicate``; returns them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [d for d in self.deliveries if d.done and predicate(d)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {len(found)} of {count} deliveries arrived")
                self._cond.wait(left)

    def notifications(self, subscription_id: str | None = None) -> list[Delivery]:
        return [
            d
            for d in self.deliveries
            if d.kind == "notification"
            and (subscription_id is None or d.subscription_id == subscription_id)
        ]

    def reset(self) -> None:
        """Forget faults, policies and test hooks (meetings and subscriptions stay)."""
        with self._lock:
            self._faults.clear()
            self._policies.clear()
            self._duplicate = 0
            self._reorder_armed = False
            self._held = None
            self._early_join = None

    # --- lookups ------------------------------------------------------------------------------

    def meeting_by_join_url(self, join_web_url: str) -> Meeting:
        target = _normalize_join_url(join_web_url)
        for meeting in self.meetings.values():
            if _normalize_join_url(meeting.join_web_url) == target:
                return meeting
        raise KeyError(join_web_url)

    def meeting_by_external_id(self, external_id: str) -> Meeting:
        for meeting in self.meetings.values():
            if meeting.external_id == external_id:
                return meeting
        raise KeyError(external_id)

    def subscriptions_for(self, meeting_id: str) -> list[Subscription]:
        return [s for s in self.subscriptions.values() if s.meeting_id == meeting_id]

    # --- meeting actions (the page and tests use these) ---------------------------------------

    def join(
        self,
        meeting_id: str,
        role: Role,
        *,
        oid: str | None = None,
        display_name: str | None = None,
        identity: IdentityKind | None = None,
    ) -> str:
        """Someone opens the meeting. Organizer and same-tenant staff per ``lobbyBypassSettings``
        go straight in; guests wait in the lobby. Returns the participant id."""
        with self._lock:
            meeting = self.meetings[meeting_id]
            if role == "organizer":
                oid = meeting.organizer_oid
            elif role == "staff" and oid is None:
                staff = [
                    u
                    for u in self.entra.users_in(meeting.tid)
                    if u.oid != meeting.organizer_oid and u.kind in ("staff", "clinician")
                ]
                if not staff:
                    raise ValueError("no staff user to join as")
                oid = staff[0].oid
            if role in ("organizer", "staff"):
                assert oid is not None
                user = self.entra.users[oid]
                participant = Participant(
                    id=str(uuid.uuid4()),
                    role=role,
                    display_name=user.display_name,
                    identity_kind="user",
                    oid=user.oid,
                    tid=user.tid,
                )
            else:
                kind: IdentityKind = identity or "guest"
                participant = Participant(
                    id=str(uuid.uuid4()),
                    role="guest",
                    display_name=(display_name or "Guest").strip()[:100] or "Guest",
                    identity_kind=kind,
                    acs_id=f"8:acs:sandbox-acs-resource_{uuid.uuid4()}" if kind == "acs" else None,
                )
            meeting.participants[participant.id] = participant
            if self._bypasses_lobby(meeting, participant):
                self._enter_call(meeting, participant)
            return participant.id

    def admit(self, meeting_id: str, participant_id: str) -> None:
        """Let a participant in from the lobby."""
        with self._lock:
            meeting = self.meetings[meeting_id]
            participant = meeting.participants[participant_id]
            if participant.state != "lobby":
                return
            self._enter_call(meeting, participant)

    def admit_all(self, meeting_id: str) -> None:
        for participant in list(self.meetings[meeting_id].in_lobby()):
            self.admit(meeting_id, participant.id)

    def leave(self, meeting_id: str, participant_id: str) -> None:
        """A participant hangs up (or leaves the lobby). The last one out ends the call."""
        with self._lock:
            meeting = self.meetings[meeting_id]
            participant = meeting.participants[participant_id]
            was_in_call = participant.state == "in_meeting"
            participant.state = "left"
            participant.left_at = _now()
            if not was_in_call:
                return
            self._emit(meeting, "Microsoft.Communication.CallRosterUpdate", exited=[participant])
            if not meeting.in_call():
                meeting.call_active = False
                self._emit(meeting, "Microsoft.Communication.CallEnded", state="inactive")

    def end_meeting(self, meeting_id: str) -> None:
        """Everyone leaves (lobby included)."""
        meeting = self.meetings[meeting_id]
        for participant in list(meeting.participants.values()):
            if participant.state != "left":
                self.leave(meeting_id, participant.id)

    def _bypasses_lobby(self, meeting: Meeting, participant: Participant) -> bool:
        if participant.role == "organizer":
            return True
        scope = str(meeting.lobby_bypass.get("scope", "organization")).lower()
        if scope == "everyone":
            return True
        if participant.identity_kind != "user":
            return False
        if scope in ("organization", "organizationexcludingguests", "organizationandfederated"):
            return participant.tid == meeting.tid or scope == "organizationandfederated"
        return False  # organizer, invited (no invitees in the sandbox)

    def _enter_call(self, meeting: Meeting, participant: Participant) -> None:
        participant.state = "in_meeting"
        participant.joined_at = _now()
        if not meeting.call_active:
            meeting.call_active = True
            self._emit(meeting, "Microsoft.Communication.CallStarted", state="active")
        self._emit(meeting, "Microsoft.Communication.CallRosterUpdate", joined=[participant])

    # --- notifications ------------------------------------------------------------------------

    def _event_time(self, meeting: Meeting) -> dt.datetime:
        now = _now()
        if meeting.last_event is not None and now <= meeting.last_event:
            now = meeting.last_event + dt.timedelta(microseconds=1)
        meeting.last_event = now
        return now

    def _emit(
        self,
        meeting: Meeting,
        event_type: str,
        *,
        state: str = "active",
        joined: Iterable[Participant] = (),
        exited: Iterable[Participant] = (),
    ) -> None:
        event: dict[str, Any] = {
            "@odata.type": "#Microsoft.Graph.onlineMeeting",
            "@odata.id": meeting.resource_id,
            "id": meeting.resource_id,
            "eventType": event_type,
            "eventDateTime": _graph_time(self._event_time(meeting)),
            "state": state,
        }
        if event_type.endswith("CallRosterUpdate"):
            event["activeParticipants@joined"] = [p.roster_entry() for p in joined]
            event["activeParticipants@exited"] = [p.roster_entry() for p in exited]
        for sub in self.subscriptions_for(meeting.id):
            if sub.active:
                self._enqueue_change(self._notification(sub, meeting, event))

    def _notification(self, sub: Subscription, meeting: Meeting, event: dict[str, Any]) -> Delivery:
        resource_data: dict[str, Any] = {
            "@odata.id": meeting.resource_id,
            "@odata.type": "#microsoft.graph.onlineMeeting",
            "id": meeting.resource_id,
        }
        item: dict[str, Any] = {
            "subscriptionId": sub.id,
            "clientState": sub.client_state,
            "changeType": "updated",
            "tenantId": sub.tid,
            "resource": meeting.resource_id,
            "subscriptionExpirationDateTime": _graph_time(sub.expiration),
            "resourceData": resource_data,
            "organizationId": sub.tid,
        }
        body: dict[str, Any] = {"value": [item]}
        if sub.include_resource_data and sub.certificate is not None:
            item["encryptedContent"] = encrypt_rich_notification(
                event, sub.certificate, sub.encryption_certificate_id or ""
            )
            body["validationTokens"] = [self.entra.mint_notification_validation_token(sub.tid)]
        else:
            resource_data.update({k: v for k, v in event.items() if k not in resource_data})
        return Delivery(
            kind="notification",
            url=sub.notification_url,
            subscription_id=sub.id,
            body=body,
            event=event,
        )

    def _enqueue_change(self, delivery: Delivery) -> None:
        with self._lock:
            if self._reorder_armed and self._held is None:
                self._reorder_armed = False
                self._held = delivery
                return
            held, self._held = self._held, None
            copies = 1
            if self._duplicate > 0:
                self._duplicate -= 1
                copies = 2
        for _ in range(copies):
            self._enqueue(delivery if _ == 0 else _clone(delivery))
        if held is not None:
            self._enqueue(held)

    def _enqueue(self, delivery: Delivery) -> None:
        self.start_delivery()
        with self._cond:
            self.deliveries.append(delivery)
            self._pending += 1
        self._queue.put(delivery)

    def _deliver_loop(self) -> None:
        while True:
            delivery = self._queue.get()
            if delivery is None:
                return
            try:
                self._deliver(delivery)
            finally:
                with self._cond:
                    delivery.done = True
                    self._pending -= 1
                    self._cond.notify_all()

    def _deliver(self, delivery: Delivery) -> None:
        assert self._client is not None
        delays = (0.0, *self.retry_delays)
        for delay in delays:
            if delay:
                time.sleep(delay)
            delivery.attempts += 1
            started = time.perf_counter()
            try:
                response = self._client.post(
                    delivery.url,
                    content=json.dumps(delivery.body).encode(),
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "User-Agent": "Microsoft-Graph-Sandbox/1.0",
                    },
                )
                delivery.status = response.status_code
                delivery.response_text = response.text[:500]
                delivery.error = None
            except httpx.HTTPError as exc:
                delivery.status = None
                delivery.error = f"{type(exc).__name__}: {exc}"
            delivery.latency_ms = (time.perf_counter() - started) * 1000
            if delivery.ok:
                return

    # --- HTTP ---------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        api = [
            Route(
                "/{ver}/users/{oid}/onlineMeetings/createOrGet",
                self._create_or_get,
                methods=["POST"],
            ),
            Route(
                "/{ver}/users/{oid}/onlineMeetings/{meeting_id}", self._get_meeting, methods=["GET"]
            ),
            Route("/{ver}/subscriptions", self._subscriptions, methods=["GET", "POST"]),
            Route(
                "/{ver}/subscriptions/{sub_id}",
                self._subscription,
                methods=["GET", "PATCH", "DELETE"],
            ),
            Route("/{ver}/subscriptions/{sub_id}/reauthorize", self._reauthorize, methods=["POST"]),
            Route("/{ver}/users", self._users, methods=["GET"]),
            Route("/{ver}/$batch", self._batch, methods=["POST"]),
        ]
        page = [
            Route("/", self._index),
            Route("/l/meetup-join/{thread}/0", self._join_page),
            Route("/sandbox/meetings/{meeting_id}", self._meeting_page),
            Route("/sandbox/meetings/{meeting_id}/join", self._page_join, methods=["POST"]),
            Route("/sandbox/meetings/{meeting_id}/admit", self._page_admit, methods=["POST"]),
            Route("/sandbox/meetings/{meeting_id}/leave", self._page_leave, methods=["POST"]),
        ]
        return api + page

    def _take_fault(self, path: str) -> Response | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_substring in path and fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    break
            else:
                return None
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        code = _FAULT_CODES.get(fault.status, "UnknownError")
        message = {
            429: "Too many requests. Please retry after the time in the Retry-After header.",
            503: "The service is temporarily unavailable. Please retry later.",
        }.get(fault.status, "Sandbox fault injection.")
        return _graph_error(fault.status, code, message, headers)

    def _authorize_call(self, request: Request, roles: set[str]) -> dict[str, Any]:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise _ApiError(401, "InvalidAuthenticationToken", "Access token is empty.")
        try:
            claims = self.entra.verify_token(auth[7:].strip(), audience=GRAPH_AUDIENCE)
        except jwt.ExpiredSignatureError as exc:
            raise _ApiError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise _ApiError(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            ) from exc
        except jwt.PyJWTError as exc:
            raise _ApiError(
                401, "InvalidAuthenticationToken", f"Access token validation failure. {exc}"
            ) from exc
        if claims.get("idtyp") != "app" and "roles" not in claims:
            raise _ApiError(
                403, "Forbidden", "This API requires an application token (client credentials)."
            )
        if not roles & set(claims.get("roles", [])):
            raise _ApiError(403, "Forbidden", "Insufficient privileges to complete the operation.")
        return claims

    async def _api(
        self, request: Request, roles: set[str], handler: Callable[..., Any]
    ) -> Response:
        path = request.url.path
        response: Response
        if request.path_params.get("ver") not in ("v1.0", "beta"):
            response = _graph_error(400, "BadRequest", "Invalid version.")
        elif (fault := self._take_fault(path)) is not None:
            response = fault
        else:
            try:
                claims = self._authorize_call(request, roles)
                response = await handler(request, claims)
            except _ApiError as err:
                response = _graph_error(err.status, err.code, err.message)
        self.requests.append((request.method, path, response.status_code))
        return response

    async def _json_body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise _ApiError(
                400, "BadRequest", f"Unable to read JSON request payload: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise _ApiError(400, "BadRequest", "The request body must be a JSON object.")
        return body

    # meetings -------------------------------------------------------------------------------------

    async def _create_or_get(self, request: Request) -> Response:
        return await self._api(request, _WRITE_ROLES, self._do_create_or_get)

    def _check_organizer(self, claims: Mapping[str, Any], oid: str) -> None:
        user = self.entra.users.get(oid.lower())
        if user is None or user.tid != claims["tid"]:
            raise _ApiError(404, "NotFound", f"User '{oid}' was not found in the tenant.")
        with self._lock:
            allowed = self._policies.get(user.oid, self._policies.get(user.tid, True))
        if not allowed:
            raise _ApiError(403, "Forbidden", "No application access policy found for this app.")

    async def _do_create_or_get(self, request: Request, claims: dict[str, Any]) -> Response:
        oid = request.path_params["oid"].lower()
        self._check_organizer(claims, oid)
        body = await self._json_body(request)
        external_id = body.get("externalId")
        if not isinstance(external_id, str) or not external_id:
            raise _ApiError(400, "BadRequest", "externalId is required for createOrGet.")
        start_raw, end_raw = body.get("startDateTime"), body.get("endDateTime")
        try:
            start = _parse_time(start_raw) if start_raw else _now()
            if end_raw and not start_raw:
                raise _ApiError(
                    400, "BadRequest", "endDateTime cannot be provided without startDateTime."
                )
            end = _parse_time(end_raw) if end_raw else start + dt.timedelta(hours=1)
        except ValueError as exc:
            raise _ApiError(400, "BadRequest", f"Invalid date time: {exc}") from exc
        if end < start:
            raise _ApiError(400, "BadRequest", "endDateTime must be later than startDateTime.")
        key = (claims["tid"], oid, external_id)
        with self._lock:
            existing = self._by_external.get(key)
            if existing is not None:
                return JSONResponse(
                    self._meeting_json(self.meetings[existing], request), status_code=200
                )
            meeting = self._new_meeting(claims["tid"], oid, external_id, body, start, end)
        return JSONResponse(self._meeting_json(meeting, request), status_code=201)

    def _new_meeting(
        self,
        tid: str,
        oid: str,
        external_id: str,
        body: dict[str, Any],
        start: dt.datetime,
        end: dt.datetime,
    ) -> Meeting:
        thread = f"19:meeting_{base64.b64encode(secrets.token_bytes(36)).decode()[:48]}@thread.v2"
        thread = thread.replace("+", "A").replace("/", "B")
        meeting_id = base64.urlsafe_b64encode(f"1*{oid}*0**{thread}".encode()).decode().rstrip("=")
        context = json.dumps({"Tid": tid, "Oid": oid}, separators=(",", ":"))
        join = f"{self.url}/l/meetup-join/{_teams_quote(thread)}/0?context={_teams_quote(context)}"
        lobby = body.get("lobbyBypassSettings") or {}
        meeting = Meeting(
            id=meeting_id,
            tid=tid,
            organizer_oid=oid,
            external_id=external_id,
            thread_id=thread,
            join_web_url=join,
            subject=str(body.get("subject") or ""),
            start=start,
            end=end,
            created=_now(),
            lobby_bypass={
                "scope": lobby.get("scope", "organization"),
                "isDialInBypassEnabled": bool(lobby.get("isDialInBypassEnabled", False)),
            },
            allow_meeting_chat=str(body.get("allowMeetingChat") or "enabled"),
            request=body,
            meeting_code=str(secrets.randbelow(10**12)).zfill(12),
        )
        self.meetings[meeting.id] = meeting
        self._by_external[(tid, oid, external_id)] = meeting.id
        self._by_thread[thread] = meeting.id
        return meeting

    def _meeting_json(self, meeting: Meeting, request: Request | None = None) -> dict[str, Any]:
        organizer = self.entra.users[meeting.organizer_oid]
        ver = request.path_params.get("ver", "v1.0") if request else "v1.0"
        body = meeting.request
        attendees = (body.get("participants") or {}).get("attendees") or []
        return {
            "@odata.context": (
                f"{self.url}/{ver}/$metadata#users('{meeting.organizer_oid}')"
                "/onlineMeetings/$entity"
            ),
            "id": meeting.id,
            "creationDateTime": _graph_time(meeting.created),
            "startDateTime": _graph_time(meeting.start),
            "endDateTime": _graph_time(meeting.end),
            "joinUrl": meeting.join_web_url,
            "joinWebUrl": meeting.join_web_url,
            "meetingCode": meeting.meeting_code,
            "subject": meeting.subject,
            "isBroadcast": False,
            "autoAdmittedUsers": "everyoneInCompany",
            "outerMeetingAutoAdmittedUsers": None,
            "isEntryExitAnnounced": body.get("isEntryExitAnnounced", True),
            "allowedPresenters": body.get("allowedPresenters", "everyone"),
            "allowMeetingChat": meeting.allow_meeting_chat,
            "shareMeetingChatHistoryDefault": "none",
            "allowTeamworkReactions": body.get("allowTeamworkReactions", True),
            "allowAttendeeToEnableMic": body.get("allowAttendeeToEnableMic", True),
            "allowAttendeeToEnableCamera": body.get("allowAttendeeToEnableCamera", True),
            "recordAutomatically": body.get("recordAutomatically", False),
            "videoTeleconferenceId": None,
            "externalId": meeting.external_id,
            "broadcastSettings": None,
            "audioConferencing": None,
            "meetingInfo": None,
            "participants": {
                "organizer": {
                    "upn": organizer.upn,
                    "role": "presenter",
                    "identity": {
                        "application": None,
                        "device": None,
                        "user": {
                            "id": organizer.oid,
                            "displayName": None,
                            "tenantId": organizer.tid,
                            "identityProvider": "AAD",
                        },
                    },
                },
                "attendees": attendees,
                "producers": [],
                "contributors": [],
            },
            "lobbyBypassSettings": meeting.lobby_bypass,
            "joinMeetingIdSettings": {
                "isPasscodeRequired": False,
                "joinMeetingId": meeting.meeting_code,
                "passcode": None,
            },
            "chatInfo": {
                "threadId": meeting.thread_id,
                "messageId": "0",
                "replyChainMessageId": None,
            },
            "chatRestrictions": None,
            "joinInformation": None,
            "watermarkProtection": None,
        }

    async def _get_meeting(self, request: Request) -> Response:
        async def handler(req: Request, claims: dict[str, Any]) -> Response:
            oid = req.path_params["oid"].lower()
            self._check_organizer(claims, oid)
            meeting = self.meetings.get(req.path_params["meeting_id"])
            if meeting is None or meeting.organizer_oid != oid:
                raise _ApiError(404, "NotFound", "The online meeting was not found.")
            return JSONResponse(self._meeting_json(meeting, req))

        return await self._api(request, _READ_ROLES, handler)

    # subscriptions --------------------------------------------------------------------------------

    async def _subscriptions(self, request: Request) -> Response:
        if request.method == "GET":

            async def listing(req: Request, claims: dict[str, Any]) -> Response:
                subs = [
                    s.to_json(self.url)
                    for s in self.subscriptions.values()
                    if s.tid == claims["tid"]
                    and s.application_id == claims.get("appid")
                    and not s.deleted
                ]
                return JSONResponse({"value": subs})

            return await self._api(request, _READ_ROLES, listing)
        return await self._api(request, _READ_ROLES, self._create_subscription)

    def _resolve_resource(self, resource: str, tid: str) -> Meeting:
        match = _MEETING_RESOURCE.match(resource.strip()) or _MEETING_RESOURCE_V2.match(
            resource.strip()
        )
        if not match:
            raise _ApiError(
                400,
                "InvalidRequest",
                f"Resource '{resource}' is not supported. Use "
                "communications/onlineMeetings/?$filter=JoinWebUrl eq '{joinWebUrl}'.",
            )
        url = match.group("url")
        try:
            meeting = self.meeting_by_join_url(url)
        except KeyError:
            try:
                meeting = self.meeting_by_join_url(unquote(url))
            except KeyError:
                raise _ApiError(
                    404,
                    "ResourceNotFound",
                    "The online meeting for the given JoinWebUrl was not found.",
                ) from None
        if meeting.tid != tid:
            raise _ApiError(
                404,
                "ResourceNotFound",
                "The online meeting for the given JoinWebUrl was not found.",
            )
        return meeting

    def _check_expiration(self, value: Any) -> dt.datetime:
        if not isinstance(value, str) or not value:
            raise _ApiError(
                400,
                "ExtensionError",
                "expirationDateTime is a required property for subscription creation.",
            )
        try:
            expiration = _parse_time(value)
        except ValueError as exc:
            raise _ApiError(400, "BadRequest", f"Invalid expirationDateTime: {exc}") from exc
        now = _now()
        if expiration <= now:
            raise _ApiError(400, "ExtensionError", "Subscription expiration must be in the future.")
        if expiration > now + dt.timedelta(minutes=self.max_subscription_minutes):
            raise _ApiError(
                400,
                "ExtensionError",
                f"Subscription expiration can only be {self.max_subscription_minutes} minutes "
                "in the future.",
            )
        return expiration

    async def _create_subscription(self, request: Request, claims: dict[str, Any]) -> Response:
        body = await self._json_body(request)
        change_type = body.get("changeType")
        if not change_type:
            raise _ApiError(
                400,
                "ExtensionError",
                "changeType is a required property for subscription creation.",
            )
        if {c.strip() for c in str(change_type).split(",")} != {"updated"}:
            raise _ApiError(
                400,
                "ExtensionError",
                f"ChangeType '{change_type}' is not supported for this resource; use 'updated'.",
            )
        notification_url = body.get("notificationUrl")
        if not isinstance(notification_url, str) or not notification_url.startswith(
            ("https://", "http://")
        ):
            raise _ApiError(
                400,
                "ExtensionError",
                "notificationUrl is a required property and must be an absolute URL.",
            )
        lifecycle_url = body.get("lifecycleNotificationUrl")
        if lifecycle_url is not None and (
            not isinstance(lifecycle_url, str)
            or not lifecycle_url.startswith(("https://", "http://"))
        ):
            raise _ApiError(
                400, "ExtensionError", "lifecycleNotificationUrl must be an absolute URL."
            )
        resource = body.get("resource")
        if not isinstance(resource, str) or not resource:
            raise _ApiError(
                400, "ExtensionError", "resource is a required property for subscription creation."
            )
        meeting = self._resolve_resource(resource, claims["tid"])
        expiration = self._check_expiration(body.get("expirationDateTime"))
        client_state = body.get("clientState")
        if client_state is not None and (
            not isinstance(client_state, str) or len(client_state) > 128
        ):
            raise _ApiError(
                400, "ExtensionError", "clientState must be a string of at most 128 characters."
            )
        include = bool(body.get("includeResourceData", False))
        cert: x509.Certificate | None = None
        if include:
            cert_b64, cert_id = (
                body.get("encryptionCertificate"),
                body.get("encryptionCertificateId"),
            )
            if not cert_b64 or not cert_id:
                raise _ApiError(
                    400,
                    "ExtensionError",
                    "encryptionCertificate and encryptionCertificateId are required when "
                    "includeResourceData is true.",
                )
            try:
                cert = load_encryption_certificate(str(cert_b64))
            except Exception as exc:
                raise _ApiError(
                    400,
                    "ExtensionError",
                    f"encryptionCertificate is not a valid base64 X.509 certificate: {exc}",
                ) from exc
            key = cert.public_key()
            if not isinstance(key, rsa.RSAPublicKey) or not 2048 <= key.key_size <= 4096:
                raise _ApiError(
                    400,
                    "ExtensionError",
                    "The encryption certificate key must be RSA, 2048 to 4096 bits.",
                )
            if len(str(cert_id)) > 128:
                raise _ApiError(
                    400, "ExtensionError", "encryptionCertificateId can be up to 128 characters."
                )
        for url in (notification_url, lifecycle_url):
            if url is not None:
                await self._validate_endpoint(url)
        sub = Subscription(
            id=str(uuid.uuid4()),
            tid=claims["tid"],
            application_id=str(claims.get("appid", "")),
            creator_id=str(claims.get("oid", "")),
            resource=resource,
            change_type="updated",
            notification_url=notification_url,
            lifecycle_notification_url=lifecycle_url,
            expiration=expiration,
            client_state=client_state,
            include_resource_data=include,
            encryption_certificate=body.get("encryptionCertificate") if include else None,
            encryption_certificate_id=body.get("encryptionCertificateId") if include else None,
            certificate=cert,
            meeting_id=meeting.id,
            api_version=request.path_params["ver"],
            latest_supported_tls_version=str(body.get("latestSupportedTlsVersion") or "v1_2"),
        )
        with self._lock:
            self.subscriptions[sub.id] = sub
            early = self._early_join
            if early is not None and early[1] in (None, meeting.external_id):
                self._early_join = None
            else:
                early = None
        if early is not None:
            await asyncio.to_thread(self._join_and_wait_delivered, sub.id, meeting.id, early[0])
        return JSONResponse(sub.to_json(self.url), status_code=201)

    async def _validate_endpoint(self, url: str) -> None:
        token = (
            "Validation: Testing client application reachability for subscription Request-Id: "
            f"{uuid.uuid4()} Nonce: {base64.b64encode(secrets.token_bytes(9)).decode()}+/=&%"
        )
        sep = "&" if "?" in url else "?"
        target = f"{url}{sep}validationToken={quote(token, safe='')}"
        delivery = Delivery(
            kind="validation",
            url=target,
            subscription_id=None,
            body=None,
            attempts=1,
            validation_token=token,
        )
        started = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=VALIDATION_TIMEOUT, trust_env=True) as client:
                response = await client.post(
                    target,
                    content=b"",
                    headers={
                        "Content-Type": "text/plain; charset=utf-8",
                        "User-Agent": "Microsoft-Graph-Sandbox/1.0",
                    },
                )
            delivery.status = response.status_code
            delivery.response_text = response.text[:500]
            content_type = response.headers.get("content-type", "")
            if response.status_code != 200:
                delivery.error = f"status {response.status_code}"
            elif not content_type.lower().startswith("text/plain"):
                delivery.error = f"content-type {content_type!r}, expected text/plain"
            elif response.text != token:
                delivery.error = "the response body is not the validation token"
        except httpx.HTTPError as exc:
            delivery.error = f"{type(exc).__name__}: {exc}"
        delivery.latency_ms = (time.perf_counter() - started) * 1000
        delivery.done = True
        with self._cond:
            self.deliveries.append(delivery)
            self._cond.notify_all()
        if delivery.error is not None:
            raise _ApiError(
                400,
                "InvalidRequest",
                "Subscription validation request failed. Notification endpoint must respond with "
                f"200 OK to validation request. ({delivery.error})",
            )

    def _own_subscription(self, claims: Mapping[str, Any], sub_id: str) -> Subscription:
        sub = self.subscriptions.get(sub_id)
        if (
            sub is None
            or sub.deleted
            or sub.tid != claims["tid"]
            or sub.application_id != claims.get("appid")
        ):
            raise _ApiError(
                404,
                "ResourceNotFound",
                f"Resource '{sub_id}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )
        return sub

    async def _subscription(self, request: Request) -> Response:
        async def handler(req: Request, claims: dict[str, Any]) -> Response:
            sub = self._own_subscription(claims, req.path_params["sub_id"])
            if req.method == "GET":
                return JSONResponse(sub.to_json(self.url))
            if req.method == "DELETE":
                with self._lock:
                    sub.deleted = True
                return Response(status_code=204)
            body = await self._json_body(req)
            if sub.removed or sub.expiration <= _now():
                raise _ApiError(
                    404,
                    "ResourceNotFound",
                    f"Resource '{sub.id}' does not exist (subscription removed).",
                )
            expiration = self._check_expiration(body.get("expirationDateTime"))
            cert = sub.certificate
            if body.get("encryptionCertificate"):
                try:
                    cert = load_encryption_certificate(str(body["encryptionCertificate"]))
                except Exception as exc:
                    raise _ApiError(
                        400, "ExtensionError", f"encryptionCertificate is not valid: {exc}"
                    ) from exc
            with self._lock:
                sub.expiration = expiration
                sub.reauthorized_at = _now()
                sub.renewals += 1
                if body.get("encryptionCertificate"):
                    sub.certificate = cert
                    sub.encryption_certificate = str(body["encryptionCertificate"])
                    sub.encryption_certificate_id = str(
                        body.get("encryptionCertificateId") or sub.encryption_certificate_id
                    )
            return JSONResponse(sub.to_json(self.url))

        return await self._api(request, _READ_ROLES, handler)

    async def _reauthorize(self, request: Request) -> Response:
        async def handler(req: Request, claims: dict[str, Any]) -> Response:
            sub = self._own_subscription(claims, req.path_params["sub_id"])
            if sub.removed or not sub.active:
                raise _ApiError(
                    404, "ResourceNotFound", f"Resource '{sub.id}' does not exist or has expired."
                )
            with self._lock:
                sub.reauthorized_at = _now()
            return Response(status_code=204)

        return await self._api(request, _READ_ROLES, handler)

    # directory search ---------------------------------------------------------------------------

    async def _users(self, request: Request) -> Response:
        """``GET /v1.0/users`` with ``$search``, as Graph answers it for directory objects:
        ``ConsistencyLevel: eventual`` required, clauses ``"property:value"`` joined by OR/AND,
        ``displayName`` tokenized (each word of the value is a prefix of a word of the name),
        other properties matched with startsWith; ``$select``, ``$top``, ``$count``,
        ``$orderby=displayName``. Users of the token's tenant only."""
        path = request.url.path
        response: Response
        if request.path_params.get("ver") not in ("v1.0", "beta"):
            response = _graph_error(400, "BadRequest", "Invalid version.")
        elif (fault := self._take_fault(path)) is not None:
            response = fault
        else:
            try:
                claims = self._directory_claims(request)
                response = self._directory_answer(request, claims)
            except _ApiError as err:
                response = _graph_error(err.status, err.code, err.message)
        self.requests.append((request.method, path, response.status_code))
        return response

    async def _batch(self, request: Request) -> Response:
        """``POST /v1.0/$batch`` (JSON batching): ``{"requests": [{"id", "method", "url",
        "headers"?}]}``, 1 to 20 requests with distinct ids (compared ignoring case), ``url``
        relative to the version (``/users?...``). Each is answered as if sent alone, with the
        batch's ``Authorization`` (its own faults and status; a token that is not genuine fails
        the whole batch with 401); the stand-in serves ``GET /users`` only. Responses come back
        in reverse order: Graph promises no order, only the ids."""
        path = request.url.path
        ver = request.path_params.get("ver")
        if ver not in ("v1.0", "beta"):
            response: Response = _graph_error(400, "BadRequest", "Invalid version.")
        elif (fault := self._take_fault(path)) is not None:
            response = fault
        else:
            try:
                self._batch_token(request)
                steps = _batch_steps(await request.body())
            except _ApiError as err:
                response = _graph_error(err.status, err.code, err.message)
            else:
                answers = [await self._batch_step(request, str(ver), step) for step in steps]
                response = JSONResponse({"responses": answers[::-1]})
        self.requests.append((request.method, path, response.status_code))
        return response

    def _batch_token(self, request: Request) -> None:
        """The batch's own token check (401); what it may do is checked per request."""
        auth = request.headers.get("authorization", "")
        try:
            self.entra.verify_token(auth[7:].strip(), audience=[GRAPH_AUDIENCE, GRAPH_APP_ID])
        except jwt.PyJWTError as exc:
            raise _ApiError(
                401, "InvalidAuthenticationToken", f"Access token validation failure. {exc}"
            ) from exc

    async def _batch_step(self, batch: Request, ver: str, step: dict[str, Any]) -> dict[str, Any]:
        target, _, query = str(step["url"]).lstrip("/").partition("?")
        if str(step["method"]).upper() != "GET" or target.rstrip("/").lower() != "users":
            answer: Response = _graph_error(
                400, "BadRequest", "The sandbox's $batch serves GET /users only."
            )
        else:
            headers = [(b"authorization", batch.headers.get("authorization", "").encode())]
            headers += [
                (str(k).lower().encode(), str(v).encode())
                for k, v in (step.get("headers") or {}).items()
                if str(k).lower() != "authorization"
            ]
            answer = await self._users(
                Request(
                    {
                        "type": "http",
                        "method": "GET",
                        "scheme": batch.url.scheme,
                        "server": batch.scope.get("server"),
                        "root_path": "",
                        "path": f"/{ver}/users",
                        "query_string": query.encode(),
                        "headers": headers,
                        "path_params": {"ver": ver},
                    }
                )
            )
        out: dict[str, Any] = {"id": step["id"], "status": answer.status_code}
        retry_after = answer.headers.get("retry-after")
        if retry_after is not None:
            out["headers"] = {"Retry-After": retry_after}
        out["body"] = json.loads(bytes(answer.body))
        return out

    def _directory_claims(self, request: Request) -> dict[str, Any]:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise _ApiError(401, "InvalidAuthenticationToken", "Access token is empty.")
        try:
            # Delegated Graph tokens carry aud 00000003-...; app-only ones the resource URL.
            claims = self.entra.verify_token(
                auth[7:].strip(), audience=[GRAPH_AUDIENCE, GRAPH_APP_ID]
            )
        except jwt.ExpiredSignatureError as exc:
            raise _ApiError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            ) from exc
        except jwt.PyJWTError as exc:
            raise _ApiError(
                401, "InvalidAuthenticationToken", f"Access token validation failure. {exc}"
            ) from exc
        scopes = set(str(claims.get("scp", "")).split())
        roles = set(claims.get("roles", []) or [])
        if not (scopes & _DIRECTORY_SCOPES or roles & _DIRECTORY_ROLES):
            raise _ApiError(403, "Authorization_RequestDenied", _INSUFFICIENT)
        claims["_basic_only"] = not (scopes & _DIRECTORY_FULL or roles & _DIRECTORY_ROLES)
        return claims

    def _directory_answer(self, request: Request, claims: dict[str, Any]) -> Response:
        params = request.query_params
        search = params.get("$search")
        if search is not None and request.headers.get("consistencylevel", "").lower() != "eventual":
            raise _ApiError(
                400,
                "Request_UnsupportedQuery",
                "Request with $search query parameter only works through MSGraph with a special "
                "request header: 'ConsistencyLevel: eventual'",
            )
        select = [s.strip() for s in params.get("$select", "").split(",") if s.strip()]
        fields = select or list(_USER_DEFAULT_FIELDS)
        unknown = [f for f in fields if f.lower() not in _USER_FIELDS]
        if unknown:
            raise _ApiError(
                400,
                "Request_BadRequest",
                f"Could not find a property named '{unknown[0]}' on type 'microsoft.graph.user'.",
            )
        if claims["_basic_only"] and any(f.lower() not in _USER_BASIC for f in fields):
            raise _ApiError(403, "Authorization_RequestDenied", _INSUFFICIENT)
        try:
            top = int(params.get("$top", "100"))
        except ValueError:
            raise _ApiError(400, "BadRequest", "Invalid value for $top.") from None
        if not 1 <= top <= 999:
            raise _ApiError(400, "Request_BadRequest", f"Invalid page size specified: '{top}'.")
        users = list(self.entra.users_in(str(claims["tid"])))
        if search is not None:
            match = _parse_directory_search(search)
            users = [u for u in users if match(u)]
        id_filter = params.get("$filter")
        if id_filter is not None:  # "id in ('a','b')": at most 15 values, as Graph allows
            ids = _parse_id_filter(id_filter)
            users = [u for u in users if u.oid in ids]
        order = params.get("$orderby", "")
        if order:
            if order.strip().lower() not in ("displayname", "displayname asc", "displayname desc"):
                raise _ApiError(
                    400, "Request_UnsupportedQuery", f"Unsupported sort property '{order}'."
                )
            users.sort(
                key=lambda u: u.display_name.lower(), reverse=order.strip().lower().endswith("desc")
            )
        rows = [{name: _user_property(u, name) for name in fields} for u in users[:top]]
        ver = request.path_params["ver"]
        body: dict[str, Any] = {
            "@odata.context": f"https://graph.microsoft.com/{ver}/$metadata#users"
            + (f"({','.join(select)})" if select else "")
        }
        if params.get("$count", "").lower() == "true":
            body["@odata.count"] = len(users)
        body["value"] = rows
        return JSONResponse(body)

    # meeting page ---------------------------------------------------------------------------------

    async def _index(self, request: Request) -> HTMLResponse:
        rows = "".join(
            f'<li><a class="meeting" data-meeting-id="{html.escape(m.id)}" '
            f'href="{html.escape(m.join_web_url)}">{html.escape(m.subject or "(no subject)")}</a>'
            f" - {len(m.in_call())} in call, {len(m.in_lobby())} in lobby</li>"
            for m in self.meetings.values()
        )
        return HTMLResponse(
            _page("Microsoft Graph / Teams (sandbox)", f'<ul class="meetings">{rows}</ul>')
        )

    def _page_url(self, meeting: Meeting, participant_id: str | None = None) -> str:
        url = f"{self.url}/sandbox/meetings/{meeting.id}"
        return url + (f"?{urlencode({'participant': participant_id})}" if participant_id else "")

    async def _join_page(self, request: Request) -> Response:
        meeting_id = self._by_thread.get(request.path_params["thread"])
        if meeting_id is None:
            return HTMLResponse(
                _page(
                    "Teams meeting (sandbox)",
                    '<p class="error">This meeting link is not valid.</p>',
                ),
                status_code=404,
            )
        meeting = self.meetings[meeting_id]
        anon = request.query_params.get("anon", "").lower() == "true"
        return HTMLResponse(self._render_join(meeting, guest_only=anon))

    def _render_join(self, meeting: Meeting, *, guest_only: bool) -> str:
        action = html.escape(f"{self.url}/sandbox/meetings/{meeting.id}/join")
        guest = (
            f'<form class="join-guest" method="post" action="{action}">'
            '<input type="hidden" name="role" value="guest">'
            '<label>Your name <input class="guest-name" name="displayName" required '
            'maxlength="100" autocomplete="off"></label> '
            '<button type="submit" class="join" data-role="guest">Join now</button></form>'
        )
        if guest_only:
            body = "<p>Join as a guest from your browser. No account or app needed.</p>" + guest
            return _page(
                "Teams meeting (sandbox)",
                f'<div class="join-page" '
                f'data-meeting-id="{html.escape(meeting.id)}" data-mode="guest">'
                f"{body}</div>",
            )
        organizer = self.entra.users[meeting.organizer_oid]
        staff_options = "".join(
            f'<option value="{u.oid}">{html.escape(u.display_name)} '
            f"({html.escape(_persona(u))})</option>"
            for u in self.entra.users_in(meeting.tid)
            if u.oid != organizer.oid
        )
        body = (
            f'<form class="join-organizer" method="post" action="{action}">'
            '<input type="hidden" name="role" value="organizer">'
            f'<button type="submit" class="join" data-role="organizer">Join as organizer '
            f"({html.escape(organizer.display_name)}, {html.escape(_persona(organizer))}: the "
            "clinician whose launch created this meeting)</button></form>"
            f'<form class="join-staff" method="post" action="{action}">'
            '<input type="hidden" name="role" value="staff">'
            f'<select name="oid" class="staff-user">{staff_options}</select> '
            '<button type="submit" class="join" data-role="staff">Join as staff</button></form>'
            "<h2>Guest</h2>" + guest
        )
        return _page(
            "Teams meeting (sandbox)",
            f'<div class="join-page" '
            f'data-meeting-id="{html.escape(meeting.id)}" data-mode="all">{body}</div>',
        )

    async def _page_join(self, request: Request) -> Response:
        meeting = self.meetings.get(request.path_params["meeting_id"])
        if meeting is None:
            return HTMLResponse(
                _page("Teams meeting (sandbox)", "<p>Unknown meeting.</p>"), status_code=404
            )
        form = await _form(request)
        role = form.get("role", "guest")
        if role not in ("organizer", "staff", "guest"):
            return HTMLResponse("bad role", status_code=400)
        oid = form.get("oid") or None
        if role == "staff" and (oid not in self.entra.users):
            oid = None
        participant_id = self.join(
            meeting.id,
            role,  # type: ignore[arg-type]
            oid=oid,
            display_name=form.get("displayName"),
        )
        return RedirectResponse(self._page_url(meeting, participant_id), status_code=303)

    async def _page_admit(self, request: Request) -> Response:
        meeting = self.meetings.get(request.path_params["meeting_id"])
        if meeting is None:
            return HTMLResponse("unknown meeting", status_code=404)
        form = await _form(request)
        actor = meeting.participants.get(form.get("by", ""))
        target = form.get("participant", "")
        if actor is None or actor.state != "in_meeting" or actor.identity_kind != "user":
            return HTMLResponse("only someone in the meeting can admit", status_code=403)
        if target in meeting.participants:
            self.admit(meeting.id, target)
        return RedirectResponse(self._page_url(meeting, actor.id), status_code=303)

    async def _page_leave(self, request: Request) -> Response:
        meeting = self.meetings.get(request.path_params["meeting_id"])
        if meeting is None:
            return HTMLResponse("unknown meeting", status_code=404)
        form = await _form(request)
        participant_id = form.get("participant", "")
        if participant_id in meeting.participants:
            self.leave(meeting.id, participant_id)
        return RedirectResponse(self._page_url(meeting, participant_id), status_code=303)

    def _who(self, participant: Participant) -> str:
        """Who a participant is, for the meeting page: their part and, for staff, persona."""
        if participant.role == "guest":
            return "guest: a patient or family member, joined from the browser without an account"
        user = self.entra.users.get(participant.oid or "")
        persona = _persona(user) if user is not None else "staff"
        if participant.role == "organizer":
            return f"organizer, {persona}: their launch created the meeting"
        return f"staff, {persona}: same organization, joined without the lobby"

    async def _meeting_page(self, request: Request) -> Response:
        meeting = self.meetings.get(request.path_params["meeting_id"])
        if meeting is None:
            return HTMLResponse(
                _page("Teams meeting (sandbox)", "<p>Unknown meeting.</p>"), status_code=404
            )
        me = meeting.participants.get(request.query_params.get("participant", ""))
        if me is None:
            return HTMLResponse(self._render_join(meeting, guest_only=False))
        base = f"{self.url}/sandbox/meetings/{meeting.id}"
        head = ""
        parts = [
            f'<div class="participant-state" data-state="{me.state}" '
            f'data-participant-id="{me.id}" data-role="{me.role}">',
            f'<p class="you">You are {html.escape(me.display_name)}: '
            f"{html.escape(self._who(me))}.</p>",
        ]
        if me.state == "lobby":
            head = '<meta http-equiv="refresh" content="2">'
            parts.append('<p class="lobby">Someone in the meeting should let you in soon.</p>')
        elif me.state == "left":
            parts.append(
                '<p class="left">You left the meeting.</p>'
                f'<p><a class="rejoin" href="{html.escape(meeting.join_web_url)}">'
                "Rejoin</a></p>"
            )
        else:
            head = '<meta http-equiv="refresh" content="3">'
            parts.append('<p class="in-meeting">You are in the meeting.</p>')
        parts.append("</div>")
        if me.state != "left":
            parts.append(
                f'<form class="leave" method="post" action="{html.escape(base)}/leave">'
                f'<input type="hidden" name="participant" value="{me.id}">'
                '<button type="submit" class="leave">Leave</button></form>'
            )
        if me.state == "in_meeting":
            roster = "".join(
                f'<li class="participant" data-participant-id="{p.id}" data-role="{p.role}" '
                f'data-state="{p.state}">{html.escape(p.display_name)} '
                f'<span class="who">({html.escape(self._who(p))})</span>'
                f"{' <strong>(you)</strong>' if p.id == me.id else ''}</li>"
                for p in meeting.in_call()
            )
            parts.append(f'<h2>In the meeting</h2><ul class="roster">{roster}</ul>')
            lobby = meeting.in_lobby()
            if lobby and me.identity_kind == "user":
                items = "".join(
                    f'<li class="lobby-participant" data-participant-id="{p.id}">'
                    f"{html.escape(p.display_name)} "
                    f'<span class="who">({html.escape(self._who(p))})</span> '
                    f'<form class="admit" method="post" action="{html.escape(base)}/admit">'
                    f'<input type="hidden" name="by" value="{me.id}">'
                    f'<input type="hidden" name="participant" value="{p.id}">'
                    f'<button type="submit" class="admit" data-participant-id="{p.id}">Admit'
                    "</button></form></li>"
                    for p in lobby
                )
                parts.append(f'<h2>Waiting in the lobby</h2><ul class="lobby">{items}</ul>')
        title = html.escape(meeting.subject or "Teams meeting")
        return HTMLResponse(
            _page("Teams meeting (sandbox)", f"<h2>{title}</h2>" + "".join(parts), head=head)
        )


def _persona(user: Any) -> str:
    """A sandbox Entra user's persona: their part in the EHR seed (clinician, interpreter,
    analyst) where they have one, else their kind (admin, approver, staff)."""
    from devtools.sandbox import seed

    practitioner = seed.PRACTITIONERS.get(getattr(user, "ehr_practitioner_id", None) or "")
    return practitioner.role if practitioner is not None else str(getattr(user, "kind", "staff"))


def _clone(delivery: Delivery) -> Delivery:
    return Delivery(
        kind=delivery.kind,
        url=delivery.url,
        subscription_id=delivery.subscription_id,
        body=delivery.body,
        event=delivery.event,
    )


def _teams_quote(value: str) -> str:
    """Percent-encode as Teams join links do (lower-case escapes, ``@`` as %40)."""
    return re.sub(
        r"%[0-9A-F]{2}",
        lambda m: m.group(0).lower() if m.group(0) != "%40" else "%40",
        quote(value, safe=""),
    )


_INSUFFICIENT = "Insufficient privileges to complete the operation."
_DIRECTORY_SCOPES = {"User.ReadBasic.All", "User.Read.All", "Directory.Read.All"}
_DIRECTORY_FULL = {"User.Read.All", "Directory.Read.All"}
_DIRECTORY_ROLES = {"User.Read.All", "Directory.Read.All"}
# User.ReadBasic.All reads only the basic profile.
_USER_BASIC = {"id", "displayname", "givenname", "surname", "mail", "userprincipalname"}
_USER_FIELDS = _USER_BASIC | {"accountenabled", "jobtitle", "preferredlanguage"}
_USER_DEFAULT_FIELDS = ("id", "displayName", "givenName", "surname", "mail", "userPrincipalName")
_SEARCHABLE = {"displayname", "mail", "userprincipalname", "givenname", "surname"}
_CLAUSE = re.compile(r'\s*(\(|\)|"(?P<clause>(?:[^"\\]|\\.)*)"|(?P<op>AND|OR)\b)\s*')


def _user_property(user: Any, name: str) -> Any:
    return {
        "id": user.oid,
        "displayname": user.display_name,
        "givenname": user.given_name,
        "surname": user.surname,
        "mail": user.upn,
        "userprincipalname": user.upn,
        "accountenabled": not user.disabled,
        "jobtitle": None,
        "preferredlanguage": None,
    }[name.lower()]


def _tokens(text: str) -> list[str]:
    """Graph tokenizes displayName on spaces, symbols and lower-to-upper case changes."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text)
    return [t for t in re.split(r"[^0-9A-Za-zÀ-ÿ]+", spaced.lower()) if t]


_ID_FILTER = re.compile(r"^\s*id\s+in\s*\((?P<ids>[^)]*)\)\s*$", re.IGNORECASE)


MAX_BATCH_REQUESTS = 20  # Graph's limit for JSON batching


def _batch_steps(raw: bytes) -> list[dict[str, Any]]:
    """The requests of a JSON batch body; ``_ApiError`` 400 for what Graph refuses."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise _ApiError(400, "BadRequest", "Invalid batch payload format.") from None
    steps = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(steps, list) or not steps:
        raise _ApiError(400, "BadRequest", "Invalid batch payload format.")
    if len(steps) > MAX_BATCH_REQUESTS:
        raise _ApiError(400, "BadRequest", f"A batch holds at most {MAX_BATCH_REQUESTS} requests.")
    seen: set[str] = set()
    for step in steps:
        if not (
            isinstance(step, dict)
            and all(isinstance(step.get(k), str) and step[k] for k in ("id", "method", "url"))
            and isinstance(step.get("headers", {}), dict)
        ):
            raise _ApiError(400, "BadRequest", "Each request needs an id, a method and a url.")
        if step["id"].lower() in seen:
            raise _ApiError(400, "BadRequest", "Batch request ids must be unique.")
        seen.add(step["id"].lower())
        if "://" in step["url"]:
            raise _ApiError(400, "BadRequest", "A batch request's url is relative (/users...).")
    return steps


def _parse_id_filter(text: str) -> set[str]:
    match = _ID_FILTER.match(text)
    ids = [v.strip() for v in match.group("ids").split(",")] if match else []
    if not match or not ids or len(ids) > 15 or not all(re.fullmatch(r"'[^']+'", v) for v in ids):
        raise _ApiError(400, "Request_UnsupportedQuery", f"Unsupported query: '{text}'.")
    return {v[1:-1] for v in ids}


def _parse_directory_search(search: str) -> Callable[[Any], bool]:
    """A predicate for ``$search``; ``_ApiError`` 400 for what Graph would refuse."""
    parts: list[tuple[str, str]] = []  # ("clause", "prop:value") or ("op", "AND"/"OR")
    position = 0
    text = search.strip()
    while position < len(text):
        found = _CLAUSE.match(text, position)
        if found is None or found.end() == position:
            raise _ApiError(
                400,
                "Request_UnsupportedQuery",
                f"Syntax error: character '{text[position]}' is not valid at position "
                f"{position} in '{text}'. Clauses are \"property:value\" in double quotes.",
            )
        if found.group("clause") is not None:
            parts.append(("clause", found.group("clause").replace('\\"', '"')))
        elif found.group("op"):
            parts.append(("op", found.group("op")))
        position = found.end()
    clauses = [value for kind, value in parts if kind == "clause"]
    if not clauses:
        raise _ApiError(400, "Request_UnsupportedQuery", "Invalid $search query: no clause.")
    tests: list[Callable[[Any], bool]] = []
    for clause in clauses:
        prop, sep, value = clause.partition(":")
        if not sep or prop.lower() not in _SEARCHABLE:
            raise _ApiError(
                400, "Request_UnsupportedQuery", f"Unsupported query on property '{prop}'."
            )
        tests.append(_clause_test(prop.lower(), value))
    ops = [value for kind, value in parts if kind == "op"]
    use_and = bool(ops) and all(op == "AND" for op in ops)

    def matches(user: Any) -> bool:
        results = (test(user) for test in tests)
        return all(results) if use_and else any(results)

    return matches


def _clause_test(prop: str, value: str) -> Callable[[Any], bool]:
    wanted = _tokens(value)
    if prop == "displayname":

        def tokenized(user: Any) -> bool:
            have = _tokens(user.display_name)
            return bool(wanted) and all(any(h.startswith(w) for h in have) for w in wanted)

        return tokenized
    prefix = value.strip().lower()

    def starts(user: Any) -> bool:
        current = _user_property(user, prop)
        return bool(prefix) and isinstance(current, str) and current.lower().startswith(prefix)

    return starts


def _normalize_join_url(url: str) -> str:
    return unquote(url).strip().lower()


async def _form(request: Request) -> dict[str, str]:
    from urllib.parse import parse_qsl

    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))


_STYLE = (
    "body{font-family:Segoe UI,system-ui,sans-serif;max-width:44rem;margin:2rem auto;"
    "color:#242424}h1{font-size:1.3rem;color:#5b5fc7}form{margin:.6rem 0}"
    "button{background:#5b5fc7;color:#fff;border:0;border-radius:4px;padding:.45rem .9rem;"
    "cursor:pointer}button.leave{background:#c4314b}.lobby{color:#616161}"
)


def _page(title: str, body: str, *, head: str = "") -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>{head}<style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


# Re-exported for tests that only import this module.
_ = (certificate_thumbprint, RichNotificationError, GRAPH_APP_ID)
