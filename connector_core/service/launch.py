"""Virtual visit launch: SMART EHR launch -> (first time: Entra sign-in) -> the Teams meeting.

Flow (docs/design.md section 5, "Launch")::

    GET launch/{provider|patient}/{configId}?iss&launch   start_launch
        approved config (cached 30 s in-process), iss == its FHIR base, SMART discovery (cached),
        sealed state + browser-binding cookie, 302 to the EHR's authorize endpoint (PKCE S256)
    GET launch/callback?code&state                        complete_launch
        state: sealed, bound to this browser, single use, issued for this issuer; code exchange;
        id_token (fhirUser) verified; launch context -> visit key
        provider: mapping EHR user -> Entra oid; none (or no longer working) -> Entra sign-in;
                  else createOrGet the meeting (its subscription: queued) -> joinWebUrl
        patient:  the visit's meeting as a browser guest (its join URL cached per worker once
                  seen); or, the visit's clinician being mapped, create it as them; else a
                  waiting page that polls GET launch/wait. Each records the patient's arrival
                  (one upsert, domain.waiting), beside the visit read when there is one
    GET launch/sso-callback?code&state                    complete_sso
        msal code redemption (PKCE + nonce), tid == config tenant, mapping stored, meeting

Privacy: raw EHR ids live only inside one request. Tables get keyed hashes (visit key, EHR user
key) and sealed values (state, the visit's EHR references); logs get keys only.

Trade-off (documented in docs/launch.md): approved configs (30 s) and EHR user mappings (5 min) are
cached in-process (``LaunchCache``), and the callback works from a sealed snapshot of the config
taken when the launch started (at most 10 minutes earlier). A config sent back for approval or
deleted stops new launches within 30 s on a worker that served it recently. This keeps a repeat
clinician's launch of a new visit at 2 table operations (state nonce, visit) and one queue
message: the meeting's Graph subscription is created by the ``meeting-subscriptions`` worker
(``service/subscriptions.py``), not while the clinician waits. A patient's launch into a meeting
this worker has seen (within 10 minutes) is 2 as well (state nonce, arrival): a visit's join URL
never changes once written, so it is cached by visit key (an HMAC of config and visit id); on a
miss the visit read and the arrival upsert go out side by side (3 operations, one round trip).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from connector_core.adapters.smart import verify_response_issuer
from connector_core.crypto import new_pkce_pair, random_token
from connector_core.domain.models import ConfigStatus, EhrUserMapping, TenantConfig, Visit
from connector_core.domain.reports import clean_department_id
from connector_core.domain.retention import mapping_needs_touch
from connector_core.domain.scopes import (
    PATIENT_LAUNCH_SCOPES,
    PROVIDER_LAUNCH_SCOPES,
    scope_string,
)
from connector_core.domain.visit_keys import (
    LaunchContext,
    ehr_user_key,
    parse_reference,
    read_launch_context,
    visit_key,
)
from connector_core.errors import (
    AuthenticationError,
    ConflictError,
    ConnectorError,
    EhrError,
    GraphError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from connector_core.logs import get_logger, log_event
from connector_core.service import launch_messages as refusals
from connector_core.service.launch_messages import Flow
from connector_core.service.subscriptions import request_subscription

# The clinician's recent visits, for their visit pages.
from connector_core.service.visit_cookie import VISIT_COOKIE, add_visit
from connector_core.ttl_cache import TtlCache

if TYPE_CHECKING:
    from connector_core.adapters.smart import SmartConfiguration, SmartTokenResponse
    from connector_core.bootstrap import Container
    from connector_core.repositories import ConfigRepository, MappingRepository

__all__ = [
    "LAUNCH_COOKIE_PREFIX",
    "SSO_COOKIE",
    "STATE_TTL_SECONDS",
    "VISIT_COOKIE",
    "WAIT_COOKIE",
    "LaunchCache",
    "LaunchResult",
    "LaunchRole",
    "SetCookie",
    "complete_launch",
    "complete_sso",
    "guest_join_url",
    "poll_waiting",
    "start_launch",
]

STATE_TTL_SECONDS = 600  # launch and sign-in state live 10 minutes
WAIT_TTL_SECONDS = 4 * 3600  # a patient may open the visit early
LAUNCH_COOKIE_PREFIX = "__Host-vvl-"
SSO_COOKIE = "__Host-vv-sso"
WAIT_COOKIE = "__Host-vv-wait"
MEETING_SUBJECT = "Virtual visit"  # never patient data
MEETING_LENGTH = timedelta(hours=1)
# A launch of a visit created this recently does not ask for its subscription again.
SUBSCRIPTION_GRACE = timedelta(seconds=30)
_CONFIG_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_PROVIDER_USER_TYPES = ("Practitioner", "PractitionerRole")
_PATIENT_USER_TYPES = ("Patient", "RelatedPerson", "Person")
_log = get_logger("launch")

_RESTART = "Start the visit again from the EHR."


class LaunchRole(StrEnum):
    PROVIDER = "provider"
    PATIENT = "patient"


@dataclass(frozen=True)
class SetCookie:
    """A ``__Host-`` cookie to set (``max_age`` 0 deletes it): Path=/, Secure, HttpOnly and
    SameSite=None, so launches also work inside an EHR's cross-site iframe; a frame navigation
    also gets it set by script as a partitioned cookie (functions/launch.py). Name and value
    must be plain RFC 6265 (token; cookie-octets): the HTTP layer refuses anything else."""

    name: str
    value: str
    max_age: int


@dataclass(frozen=True)
class LaunchResult:
    """What the browser gets: a redirect, or the patient's waiting page; plus cookies."""

    redirect: str | None = None
    waiting: bool = False
    cookies: tuple[SetCookie, ...] = ()


# --- in-process caches: approved configs and EHR user mappings --------------------------------


class LaunchCache:
    """What launches read on every click, cached in-process (one instance per worker).

    * approved configs for ``config_ttl`` (30 s): a config sent back for approval or deleted
      stops new launches within that time on a worker that served it recently;
    * EHR user -> Entra mappings for ``mapping_ttl`` (5 min): a mapping only changes when the
      old Entra user stopped working, which Graph reports (404) on the next meeting call; the
      launch then re-reads the table before asking the clinician to sign in again;
    * visit key -> the visit as this worker last read or wrote it, for ``visit_ttl`` (10 min,
      at most ``max_visits``). Its join URL never changes once written: a patient whose visit
      this worker has seen needs no visit read. A clinician's repeat launch uses the copy only
      when it also settles the subscription question (asked a moment ago, or live as read);
      otherwise the launch reads the row, which is the only place the worker's result shows.

    Negative results are never cached (a first-time clinician is looked up every time, a visit
    without its meeting is read again).
    """

    def __init__(
        self,
        configs: ConfigRepository,
        mappings: MappingRepository,
        *,
        config_ttl: float = 30.0,
        mapping_ttl: float = 300.0,
        visit_ttl: float = 600.0,
        max_visits: int = 2048,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configs = configs
        self._mappings = mappings
        self._config_ttl = config_ttl
        self._mapping_ttl = mapping_ttl
        self._visit_ttl = visit_ttl
        self._config_items: TtlCache[str, TenantConfig] = TtlCache(clock=clock)
        self._mapping_items: TtlCache[str, EhrUserMapping] = TtlCache(clock=clock)
        self._visits: TtlCache[str, Visit] = TtlCache(max_items=max_visits, clock=clock)

    def config_record(self, config_id: str) -> TenantConfig:
        """The config whatever its status (write-back also serves visits of changed configs)."""
        if not _CONFIG_ID_RE.match(config_id):
            raise NotFoundError("No configuration has this id.")
        cached = self._config_items.get(config_id)
        if isinstance(cached, TenantConfig):
            return cached
        config = self._configs.get_by_id(config_id).record
        self._config_items.put(config_id, config, ttl=self._config_ttl)
        return config

    def config(self, config_id: str) -> TenantConfig:
        """The approved config; ``NotFoundError`` / ``InvalidStateError`` (not approved)."""
        config = self.config_record(config_id)
        if config.status is not ConfigStatus.APPROVED:
            self.forget_config(config_id)
            raise refusals.not_approved()
        return config

    def forget_config(self, config_id: str) -> None:
        self._config_items.forget(config_id)

    def mapping(self, user_key: str, *, fresh: bool = False) -> tuple[EhrUserMapping | None, bool]:
        """``(mapping or None, came from the cache)``; ``fresh`` skips the cache."""
        if not fresh:
            cached = self._mapping_items.get(user_key)
            if isinstance(cached, EhrUserMapping):
                return cached, True
        try:
            mapping = self._mappings.get(user_key).record
        except NotFoundError:
            self.forget_mapping(user_key)
            return None, False
        self.remember_mapping(mapping)
        return mapping, False

    def remember_mapping(self, mapping: EhrUserMapping) -> None:
        self._mapping_items.put(mapping.ehr_user_key, mapping, ttl=self._mapping_ttl)

    def forget_mapping(self, user_key: str) -> None:
        self._mapping_items.forget(user_key)

    def join_url(self, visit_key: str) -> str | None:
        """The visit's meeting join URL as stored, when this worker saw it recently."""
        visit = self.visit(visit_key)
        return visit.join_web_url if visit is not None else None

    def visit(self, visit_key: str) -> Visit | None:
        """The visit as this worker last read or wrote it (recently), with its meeting."""
        cached = self._visits.get(visit_key)
        return cached if isinstance(cached, Visit) else None

    def remember_visit(self, visit: Visit) -> None:
        """Keep a stored visit (read from, or just written to, the table) that has its meeting."""
        if visit.join_web_url:
            self._visits.put(visit.visit_key, visit, ttl=self._visit_ttl)

    def forget_visit(self, visit_key: str) -> None:
        self._visits.forget(visit_key)


# --- small helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cfg:
    """The snapshot of the config a launch needs, sealed into its state."""

    id: str
    tenant_id: str
    iss: str  # normalized FHIR base URL (the launch's iss)
    client_id: str
    endpoint_hosts: tuple[str, ...] = ()  # the config's approved allowance (ehr_http)
    # The authorization server's issuer from discovery (RFC 9207: what a response's iss must
    # equal; Epic's is .../oauth2, not the FHIR base) and whether it always sends iss.
    as_issuer: str | None = None
    as_iss_required: bool = False
    landing: str = "visit-page"  # ProviderLanding: the visit page, or straight into the meeting

    def dump(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tid": self.tenant_id,
            "iss": self.iss,
            "cid": self.client_id,
            "eh": list(self.endpoint_hosts),
            "as": self.as_issuer,
            "asr": self.as_iss_required,
            "pl": self.landing,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> _Cfg:
        issuer = data.get("as")
        return cls(
            id=str(data["id"]),
            tenant_id=str(data["tid"]),
            iss=str(data["iss"]),
            client_id=str(data["cid"]),
            endpoint_hosts=tuple(str(h) for h in data.get("eh") or ()),
            as_issuer=issuer if isinstance(issuer, str) else None,
            as_iss_required=data.get("asr") is True,
            landing=str(data.get("pl") or "visit-page"),
        )


def _normalize_iss(url: str) -> str | None:
    """The canonical FHIR base URL (the same function the portal stores configs with, so an
    ``iss`` spelled with an explicit default port or upper-case host matches); ``None`` when
    ``url`` is not a usable base URL (which then matches nothing)."""
    from connector_core.adapters.smart import normalize_fhir_base

    try:
        return normalize_fhir_base(url)
    except InvalidInputError:
        return None


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _safe_location(container: Container, url: str, what: str) -> str:
    """A redirect target from a trusted source, still checked: absolute, no CR/LF, https
    (http only in dev mode)."""
    parts = urlsplit(url)
    if any(c in url for c in "\r\n\t\x00 ") or not parts.hostname:
        raise EhrError(f"The {what} is not a usable URL.")
    allowed = ("https", "http") if container.settings.dev_mode else ("https",)
    if parts.scheme not in allowed:
        raise EhrError(f"The {what} must be an https URL.")
    return url


def guest_join_url(join_web_url: str) -> str:
    """The Teams join link variant that goes straight to joining in the browser as a guest."""
    separator = "&" if urlsplit(join_web_url).query else "?"
    return f"{join_web_url}{separator}anon=true"


def _redirect_uri(container: Container, path: str) -> str:
    return f"{container.settings.api_base_url}/launch/{path}"


def _delete(name: str) -> SetCookie:
    return SetCookie(name, "", 0)


def _completed(cfg: _Cfg, role: str, key: str, outcome: str) -> None:
    log_event(_log, "launch.completed", config_id=cfg.id, role=role, visit_key=key, outcome=outcome)


def _warn_failed(event: str, error: ConnectorError, **keys: object) -> None:
    """A best-effort step failed and the launch goes on: a warning naming the error's type."""
    log_event(_log, event, level=logging.WARNING, **keys, error=type(error).__name__)


def _visit_cookie(container: Container, key: str, previous: str | None) -> SetCookie:
    """The visit cookie with ``key`` added to the visits the browser's cookie already holds."""
    sealed, max_age = add_visit(container.keyring, previous, key)
    return SetCookie(VISIT_COOKIE, sealed, max_age)


# --- 1. launch ------------------------------------------------------------------------------


def _session_id(value: str | None) -> str | None:
    """The launch URL's session id, or ``None``; an Epic token left unfilled is a setup
    mistake with its own message."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise refusals.session_id_missing()
    if "%" in text:
        raise refusals.session_id_unfilled()
    if len(text) > 128 or not text.isprintable():
        raise InvalidInputError("The launch URL's sessionId is not a usable id.")
    return text


def _untrusted_iss(
    container: Container, config: TenantConfig, iss: str | None
) -> PermissionDeniedError:
    """The refusal of a launch from another EHR, naming the commonest setup mistake: the
    launch URL of the tenant's other environment (test in production or the reverse)."""
    other = None
    if iss is not None:
        try:
            for versioned in container.configs.list(config.tenant_id):
                if versioned.record.id != config.id and versioned.record.fhir_base_url == iss:
                    other = versioned.record
                    break
        except ConnectorError:
            other = None  # the plain message below still holds
    if other is not None:
        return refusals.other_environment(config.environment.value, other.environment.value)
    return refusals.untrusted_iss()


def start_launch(
    container: Container,
    *,
    role: LaunchRole,
    config_id: str,
    iss: str | None,
    launch: str | None,
    session_id: str | None = None,
    department_id: str | None = None,
) -> LaunchResult:
    """Validate the EHR launch and send the browser to the EHR's authorize endpoint.

    ``session_id``: the launch URL's ``sessionId`` (or ``conferenceId``), which Epic fills from
    the integration record (``%CONFERENCEID%`` on the group-visit record, ``%CSN%`` on the
    others); kept sealed in the state, it names the visit ahead of appointment and encounter."""
    if not iss or not launch:
        raise InvalidInputError(
            "This page must be opened by the EHR: the launch parameters (iss, launch) are missing.",
            action="Start the visit from the EHR (the appointment's virtual visit button).",
        )
    if len(launch) > 2048 or len(iss) > 2048:
        raise InvalidInputError("The launch parameters are too long.")
    session = _session_id(session_id)
    config = container.launch_cache.config(config_id)
    issuer = _normalize_iss(config.fhir_base_url)
    if issuer is None or _normalize_iss(iss) != issuer:
        log_event(_log, "launch.iss_mismatch", level=logging.WARNING, config_id=config.id)
        raise _untrusted_iss(container, config, _normalize_iss(iss))
    smart = container.smart.get_configuration(
        config.fhir_base_url, allowed_hosts=config.ehr_endpoint_hosts
    )
    if not smart.supports_s256():
        raise EhrError(
            "The EHR does not support PKCE with S256, which the connector requires.",
            action="Ask your EHR analyst to enable PKCE (S256) for the connector's client.",
        )
    client_id = config.smart_client_id or container.settings.smart_client_id
    cfg = _Cfg(
        id=config.id,
        tenant_id=config.tenant_id,
        iss=issuer,
        client_id=client_id,
        endpoint_hosts=config.ehr_endpoint_hosts,
        as_issuer=smart.issuer,
        as_iss_required=smart.authorization_response_iss_parameter_supported,
        landing=config.provider_landing.value,
    )
    verifier, challenge = new_pkce_pair()
    browser_secret = random_token(32)
    cookie_id = random_token(9)
    nonce = random_token(16)
    state = container.keyring.seal(
        "launch-state",
        {
            "sid": random_token(16),  # 128 random bits: the single-use id
            "cfg": cfg.dump(),
            "role": role.value,
            "pkce": verifier,
            "nonce": nonce,
            "ck": cookie_id,
            "bind": _sha256(browser_secret),
            "sess": session,
            # The launch URL's departmentId (Epic: %PERFDEPID%), kept with the visit for reports.
            "dep": clean_department_id(department_id),
        },
        ttl_seconds=STATE_TTL_SECONDS,
    )
    scopes = PROVIDER_LAUNCH_SCOPES if role is LaunchRole.PROVIDER else PATIENT_LAUNCH_SCOPES
    url = container.smart.build_authorize_url(
        smart,
        client_id=client_id,
        redirect_uri=_redirect_uri(container, "callback"),
        scope=scope_string(scopes),
        state=state,
        code_challenge=challenge,
        aud=config.fhir_base_url,
        launch=launch,
        nonce=nonce,
    )
    log_event(_log, "launch.started", config_id=config.id, role=role.value)
    return LaunchResult(
        redirect=_safe_location(container, url, "EHR's authorization endpoint"),
        cookies=(SetCookie(LAUNCH_COOKIE_PREFIX + cookie_id, browser_secret, STATE_TTL_SECONDS),),
    )


# --- 2. callback ----------------------------------------------------------------------------


def _opens_when_expired(container: Container, purpose: str, sealed: str) -> bool:
    """Whether ``sealed`` is genuine and only too old (its own expiry, no table read)."""
    try:
        container.keyring.unseal(purpose, sealed, now=0.0)
    except AuthenticationError:
        return False
    return True


def _open_state(
    container: Container, query: Mapping[str, str], cookies: Mapping[str, str]
) -> tuple[dict[str, Any], SetCookie]:
    state = query.get("state")
    if not state:
        raise InvalidInputError("The EHR's answer has no state.", action=_RESTART)
    try:
        payload = container.keyring.unseal("launch-state", state)
    except AuthenticationError:
        if _opens_when_expired(container, "launch-state", state):
            raise refusals.state_expired() from None
        raise refusals.state_invalid() from None
    cookie_name = LAUNCH_COOKIE_PREFIX + str(payload["ck"])
    clear = _delete(cookie_name)
    secret = cookies.get(cookie_name, "")
    if not secret or not hmac.compare_digest(_sha256(secret), str(payload["bind"])):
        # Error path only: a reload after success has no cookie (cleared) but a used state.
        if container.nonces.was_consumed(str(payload["sid"])):
            raise refusals.state_used()
        raise refusals.other_browser()
    cfg = _Cfg.load(payload["cfg"])
    try:
        verify_response_issuer(query.get("iss"), issuer=cfg.as_issuer, required=cfg.as_iss_required)
    except AuthenticationError as error:
        log_event(
            _log,
            "launch.iss_refused",
            level=logging.WARNING,
            config_id=cfg.id,
            reason=error.extra.get("reason", "-"),
        )
        raise
    try:
        container.nonces.consume(
            str(payload["sid"]),
            expires_at=container.clock() + timedelta(seconds=STATE_TTL_SECONDS),
        )
    except ConflictError:
        raise refusals.state_used() from None
    return payload, clear


def complete_launch(
    container: Container, *, query: Mapping[str, str], cookies: Mapping[str, str]
) -> LaunchResult:
    payload, clear = _open_state(container, query, cookies)
    cfg = _Cfg.load(payload["cfg"])
    role = LaunchRole(payload["role"])
    error = query.get("error")
    if error:
        known = error if error in refusals.EHR_ERROR_CODES else "other"
        log_event(_log, "launch.ehr_error", config_id=cfg.id, role=role.value, error=known)
        raise refusals.ehr_refused(known)
    code = query.get("code")
    if not code:
        raise InvalidInputError("The EHR's answer has no authorization code.", action=_RESTART)

    smart = container.smart.get_configuration(cfg.iss, allowed_hosts=cfg.endpoint_hosts)
    if smart.issuer != cfg.as_issuer:
        # Discovery changed between the launch and this answer: not the server we asked.
        raise AuthenticationError(
            "The EHR's sign-in server changed during this launch.", action=_RESTART
        )
    tokens = container.smart.exchange_code(
        smart,
        client_id=cfg.client_id,
        code=code,
        redirect_uri=_redirect_uri(container, "callback"),
        code_verifier=str(payload["pkce"]),
    )
    claims: dict[str, Any] = {}
    if tokens.id_token:
        claims = container.smart.validate_id_token(
            smart, tokens.id_token, client_id=cfg.client_id, nonce=str(payload["nonce"])
        )

    context = read_launch_context(
        patient=tokens.patient, encounter=tokens.encounter, fhir_context=tokens.fhir_context
    )
    session = payload.get("sess")
    if isinstance(session, str) and session and not context.conference_id:
        # The EHR's own (authenticated) context wins; else the launch URL's session id.
        context = replace(context, conference_id=session)
    identifier = context.visit_identifier()
    if identifier is None:
        raise refusals.no_visit_context()
    key = visit_key(container.keyring, cfg.id, identifier)
    if role is LaunchRole.PROVIDER:
        fhir_user = parse_reference(claims.get("fhirUser"), expected=_PROVIDER_USER_TYPES)
        if fhir_user is None:
            raise PermissionDeniedError(
                "The EHR did not identify you as a clinician (no practitioner fhirUser).",
                action="Use the provider launch from the EHR's clinician workspace. Patients "
                "start the visit from MyChart.",
            )
        pending = _Pending(
            cfg=cfg,
            user_key=ehr_user_key(container.keyring, cfg.iss, fhir_user),
            visit_key=key,
            visit_kind=identifier.kind,
            sealed_context=_seal_context(container, cfg, context, practitioner=fhir_user),
            department_id=_department(payload),
        )
        result = _provider_continue(container, pending, visit_cookie=cookies.get(VISIT_COOKIE))
    else:
        fhir_user = parse_reference(claims.get("fhirUser"))
        if fhir_user is not None and not fhir_user.startswith(_PATIENT_USER_TYPES):
            raise PermissionDeniedError(
                "This is the patient's link, but the EHR identified a staff member.",
                action="Clinicians start the visit from the EHR's provider launch.",
            )
        result = _patient_continue(
            container,
            cfg,
            key,
            identifier.kind,
            context,
            smart,
            tokens,
            department_id=_department(payload),
        )
    return LaunchResult(
        redirect=result.redirect, waiting=result.waiting, cookies=(clear, *result.cookies)
    )


def _seal_context(
    container: Container, cfg: _Cfg, context: LaunchContext, *, practitioner: str | None
) -> str:
    return container.keyring.seal(
        "visit-context",
        {
            "fhir_base_url": cfg.iss,
            "practitioner": practitioner,
            "patient": context.patient,
            "appointment": context.appointment,
            "encounter": context.encounter,
            "conference_id": context.conference_id,
        },
    )


# --- provider -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pending:
    """A provider launch waiting for the meeting (kept sealed across the Entra sign-in)."""

    cfg: _Cfg
    user_key: str
    visit_key: str
    visit_kind: str
    sealed_context: str
    department_id: str | None = None

    def dump(self) -> dict[str, Any]:
        return {
            "dep": self.department_id,
            "cfg": self.cfg.dump(),
            "uk": self.user_key,
            "vk": self.visit_key,
            "kind": self.visit_kind,
            "ctx": self.sealed_context,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> _Pending:
        return cls(
            cfg=_Cfg.load(data["cfg"]),
            user_key=str(data["uk"]),
            visit_key=str(data["vk"]),
            visit_kind=str(data["kind"]),
            sealed_context=str(data["ctx"]),
            department_id=clean_department_id(data.get("dep")),
        )


def _provider_continue(
    container: Container, pending: _Pending, *, fresh: bool = False, visit_cookie: str | None
) -> LaunchResult:
    mapping, cached = container.launch_cache.mapping(pending.user_key, fresh=fresh)
    if mapping is None or mapping.entra_tid != pending.cfg.tenant_id:
        return _start_sso(container, pending, reason="first_time" if mapping is None else "tenant")
    try:
        visit = _open_meeting(container, pending, organizer_oid=mapping.entra_oid)
    except GraphError as error:
        if error.extra.get("reason") != "user_not_found":
            raise
        container.launch_cache.forget_mapping(pending.user_key)
        if cached:  # another worker may have re-established it already: read the table
            return _provider_continue(container, pending, fresh=True, visit_cookie=visit_cookie)
        # The mapped Entra user no longer works (deleted, moved): forget it, sign in again.
        log_event(_log, "launch.mapping_stale", config_id=pending.cfg.id, user_key=pending.user_key)
        container.mappings.delete(pending.user_key)
        return _start_sso(container, pending, reason="stale_mapping")
    _touch_mapping(container, mapping)
    return _to_meeting(container, pending, visit, visit_cookie)


def _touch_mapping(container: Container, mapping: EhrUserMapping) -> None:
    """Note that the mapping was used (the retention timer deletes long-unused ones): a write
    only when the stored ``last_used_at`` is a day old, so a repeat clinician's launch costs no
    table operation; best effort, a launch never fails for it."""
    now = container.clock()
    if not mapping_needs_touch(mapping, now=now):
        return
    touched = mapping.model_copy(update={"last_used_at": now})
    try:
        container.mappings.upsert(touched)
    except ConnectorError as error:
        _warn_failed("launch.mapping_touch_failed", error, user_key=mapping.ehr_user_key)
        return
    container.launch_cache.remember_mapping(touched)


def _to_meeting(
    container: Container, pending: _Pending, visit: Visit, visit_cookie: str | None
) -> LaunchResult:
    assert visit.join_web_url is not None
    _completed(
        pending.cfg,
        "provider",
        visit.visit_key,
        "meeting" if pending.cfg.landing == "meeting" else "visit_page",
    )
    if pending.cfg.landing == "meeting":
        target = _safe_location(container, visit.join_web_url, "meeting link")
    else:  # the clinician's visit page opens the meeting and shows who is there
        target = f"{container.settings.api_base_url}/visits/{visit.visit_key}"
    cookie = _visit_cookie(container, visit.visit_key, visit_cookie)
    return LaunchResult(redirect=target, cookies=(cookie,))


def _start_sso(container: Container, pending: _Pending, *, reason: str) -> LaunchResult:
    url, flow = container.entra_signin.start(
        tenant_id=pending.cfg.tenant_id, redirect_uri=_redirect_uri(container, "sso-callback")
    )
    sealed = container.keyring.seal(
        "launch-sso", {"flow": flow, "pending": pending.dump()}, ttl_seconds=STATE_TTL_SECONDS
    )
    log_event(
        _log,
        "launch.entra_signin",
        config_id=pending.cfg.id,
        user_key=pending.user_key,
        reason=reason,
    )
    return LaunchResult(
        redirect=_safe_location(container, url, "Microsoft sign-in URL"),
        # The cookie outlives its sealed value, so a late answer reads "expired", not
        # "another browser".
        cookies=(SetCookie(SSO_COOKIE, sealed, 2 * STATE_TTL_SECONDS),),
    )


def _sso_nonce(flow_state: str) -> str:
    return "sso-" + _sha256(flow_state)[:40]


def complete_sso(
    container: Container, *, query: Mapping[str, str], cookies: Mapping[str, str]
) -> LaunchResult:
    """Finish the clinician's Entra sign-in, remember the mapping, open the meeting."""
    sealed = cookies.get(SSO_COOKIE)
    if not sealed:
        # Error path only: a reload after success finds the cookie cleared, the answer used.
        answer = str(query.get("state", ""))
        if answer and container.nonces.was_consumed(_sso_nonce(answer)):
            raise refusals.state_used(Flow.MICROSOFT)
        raise refusals.other_browser(Flow.MICROSOFT)
    try:
        data = container.keyring.unseal("launch-sso", sealed)
    except AuthenticationError:
        if _opens_when_expired(container, "launch-sso", sealed):
            raise refusals.state_expired(Flow.MICROSOFT) from None
        raise refusals.state_invalid(Flow.MICROSOFT) from None
    flow: dict[str, Any] = dict(data["flow"])
    pending = _Pending.load(data["pending"])
    clear = _delete(SSO_COOKIE)
    if not hmac.compare_digest(str(query.get("state", "")), str(flow.get("state", ""))):
        raise AuthenticationError(
            "This Microsoft sign-in answer does not belong to this browser's sign-in.",
            action=_RESTART,
        )
    try:
        container.nonces.consume(
            _sso_nonce(str(flow["state"])),
            expires_at=container.clock() + timedelta(seconds=STATE_TTL_SECONDS),
        )
    except ConflictError:
        raise refusals.state_used(Flow.MICROSOFT) from None
    if query.get("error"):
        code = str(query["error"])[:40]
        log_event(_log, "launch.entra_error", config_id=pending.cfg.id, error=code)
        raise refusals.microsoft_signin_refused(code)
    user = container.entra_signin.complete(
        tenant_id=pending.cfg.tenant_id, flow=flow, auth_response=dict(query)
    )
    if user.tid != pending.cfg.tenant_id.lower():
        raise PermissionDeniedError(
            "You signed in with an account of another organization.",
            action="Start the visit again from the EHR and sign in with your work account of "
            "the organization that set up virtual visits.",
        )
    now = container.clock()
    mapping = EhrUserMapping(
        ehr_user_key=pending.user_key,
        region=container.settings.region,
        tenant_id=pending.cfg.tenant_id,
        entra_oid=user.oid,
        entra_tid=user.tid,
        created_at=now,
        last_used_at=now,
    )
    container.mappings.upsert(mapping)
    container.launch_cache.remember_mapping(mapping)
    log_event(_log, "launch.mapping_stored", config_id=pending.cfg.id, user_key=pending.user_key)
    try:
        visit = _open_meeting(container, pending, organizer_oid=user.oid)
    except GraphError as error:
        if error.extra.get("reason") == "user_not_found":
            container.launch_cache.forget_mapping(pending.user_key)
            container.mappings.delete(pending.user_key)
            raise GraphError(
                "Microsoft Teams does not know the account you signed in with.",
                action="Start the visit again from the EHR and sign in with your work account "
                "that has Microsoft Teams.",
            ) from None
        raise
    result = _to_meeting(container, pending, visit, cookies.get(VISIT_COOKIE))
    return LaunchResult(redirect=result.redirect, cookies=(clear, *result.cookies))


# --- the meeting ----------------------------------------------------------------------------


def _get_visit(container: Container, key: str) -> Visit | None:
    try:
        visit = container.visits.get(key).record
    except NotFoundError:
        return None
    container.launch_cache.remember_visit(visit)
    return visit


def _subscription_settled(container: Container, visit: Visit) -> bool:
    """Whether a launch of ``visit`` has nothing to ask about its subscription: live as read,
    or asked for a moment ago by its creator (see ``_subscription_if_missing``)."""
    now = container.clock()
    live = visit.subscription_id is not None and (
        visit.subscription_expires_at is None or visit.subscription_expires_at > now
    )
    return live or now - visit.created_at < SUBSCRIPTION_GRACE


def _subscription_if_missing(
    container: Container, visit: Visit, *, fresh_visit: bool = False
) -> None:
    """A visit whose meeting has no live subscription gets one from the queue worker (off the
    clinician's path; the worker is idempotent, so a duplicate request costs nothing).
    ``fresh_visit``: the visit this launch just wrote, which has none yet."""
    if not fresh_visit and _subscription_settled(container, visit):
        return
    try:
        request_subscription(
            container, visit.visit_key, reason="new_meeting" if fresh_visit else "missing"
        )
    except ConnectorError as error:  # the next launch or the renewal timer asks again
        _warn_failed("launch.subscription_request_failed", error, visit_key=visit.visit_key)


def _graph_page_error(error: GraphError) -> ConnectorError:
    if error.extra.get("reason") == "application_access_policy":
        return PermissionDeniedError(error.detail, **error.extra)
    return error


def _open_meeting(container: Container, pending: _Pending, *, organizer_oid: str) -> Visit:
    """The visit's meeting, created (with its subscription) as ``organizer_oid`` if needed."""
    read_first = pending.visit_kind == "conference"
    if read_first:
        # A group visit: another clinician or an interpreter may have opened it already; they
        # all join the meeting that exists (createOrGet is per organizer).
        existing = _get_visit(container, pending.visit_key)
        if existing is not None and existing.join_web_url:
            _subscription_if_missing(container, existing)
            return existing
    now = container.clock()
    try:
        meeting = container.graph.create_or_get_meeting(
            tenant_id=pending.cfg.tenant_id,
            organizer_oid=organizer_oid,
            external_id=pending.visit_key,
            subject=MEETING_SUBJECT,
            start=now,
            end=now + MEETING_LENGTH,
        )
    except GraphError as error:
        raise _graph_page_error(error) from None
    _safe_location(container, meeting.join_web_url, "meeting link")
    if not meeting.created and not read_first:
        known = container.launch_cache.visit(pending.visit_key)
        if (
            known is not None
            and known.join_web_url == meeting.join_web_url
            and _subscription_settled(container, known)
        ):
            return known  # a repeat launch on a worker that has seen the visit: no read
        # Another launch of this visit may have created the meeting a moment ago and not yet
        # written the visit: then this launch writes it (a create that loses is harmless).
        existing = _get_visit(container, pending.visit_key)
        if existing is not None and existing.join_web_url:
            _subscription_if_missing(container, existing)
            return existing
    visit = Visit(
        visit_key=pending.visit_key,
        region=container.settings.region,
        config_id=pending.cfg.id,
        tenant_id=pending.cfg.tenant_id,
        meeting_id=meeting.id,
        join_web_url=meeting.join_web_url,
        organizer_oid=organizer_oid,
        department_id=pending.department_id,
        sealed_context=pending.sealed_context,
        created_at=now,
        updated_at=now,
        purge_after=now + timedelta(days=container.settings.retention_days),
    )
    # Only the launch whose visit write wins asks for the subscription: one meeting, one
    # request (made side by side with the write, racing launches could each ask).
    try:
        container.visits.create(visit)
    except ConflictError:
        pass
    else:
        container.launch_cache.remember_visit(visit)
        _subscription_if_missing(container, visit, fresh_visit=True)
        return visit
    # Someone created the visit meanwhile (the patient's launch, another clinician): theirs wins.
    existing = container.visits.get(pending.visit_key).record
    container.launch_cache.remember_visit(existing)
    if existing.join_web_url != meeting.join_web_url:
        log_event(_log, "launch.duplicate_meeting", visit_key=pending.visit_key)
    if existing.join_web_url:
        _subscription_if_missing(container, existing)
        return existing
    return visit


# --- patient --------------------------------------------------------------------------------


def _department(payload: Mapping[str, Any]) -> str | None:
    value = payload.get("dep")
    return clean_department_id(value) if isinstance(value, str) else None


def _patient_continue(
    container: Container,
    cfg: _Cfg,
    key: str,
    kind: str,
    context: LaunchContext,
    smart: SmartConfiguration,
    tokens: SmartTokenResponse,
    *,
    department_id: str | None = None,
) -> LaunchResult:
    launched_at = container.clock()  # the arrival: the lobby wait starts here
    join_url = container.launch_cache.join_url(key)
    if join_url is not None:  # this worker saw the meeting: no visit read
        _record_arrival(container, key, launched_at)
        return _patient_to_meeting(container, cfg, key, join_url)
    existing = _visit_and_arrival(container, key, launched_at)
    if existing is not None and existing.join_web_url:
        return _patient_to_meeting(container, cfg, key, existing.join_web_url)
    # The clinician has not opened the visit yet. If the visit's clinician signed in before
    # (mapped), the meeting can be created as them now.
    for practitioner in _visit_practitioners(container, smart, tokens, context):
        user_key = ehr_user_key(container.keyring, cfg.iss, practitioner)
        mapping, _ = container.launch_cache.mapping(user_key)
        if mapping is None or mapping.entra_tid != cfg.tenant_id:
            continue
        pending = _Pending(
            cfg=cfg,
            user_key=user_key,
            visit_key=key,
            visit_kind=kind,
            sealed_context=_seal_context(container, cfg, context, practitioner=practitioner),
            department_id=department_id,  # the visit's department, as a clinician's would
        )
        try:
            visit = _open_meeting(container, pending, organizer_oid=mapping.entra_oid)
        except ConnectorError as error:
            # The patient cannot fix this; they wait for the clinician (who sees the error).
            log_event(
                _log,
                "launch.patient_meeting_failed",
                level=logging.WARNING,
                visit_key=key,
                error=type(error).__name__,
                reason=error.extra.get("reason", "-"),
            )
            break
        _touch_mapping(container, mapping)
        assert visit.join_web_url is not None
        return _patient_to_meeting(container, cfg, key, visit.join_web_url)
    _completed(cfg, "patient", key, "waiting")
    wait = container.keyring.seal(
        "launch-wait",
        # When the patient launched: their arrival once the meeting exists (poll_waiting), so
        # the lobby wait counts the waiting page too.
        {"vk": key, "cfg": cfg.id, "at": launched_at.isoformat()},
        ttl_seconds=WAIT_TTL_SECONDS,
    )
    return LaunchResult(waiting=True, cookies=(SetCookie(WAIT_COOKIE, wait, WAIT_TTL_SECONDS),))


def _patient_to_meeting(container: Container, cfg: _Cfg, key: str, join_url: str) -> LaunchResult:
    """The patient into the meeting's lobby (their arrival is recorded already)."""
    _completed(cfg, "patient", key, "meeting")
    return LaunchResult(
        redirect=_safe_location(container, guest_join_url(join_url), "meeting link")
    )


def _record_arrival(container: Container, key: str, at: datetime) -> None:
    """Tell the clinician's visit page that the patient is on the way (Graph reports nobody in
    the lobby), and reports when their wait began: one upsert, which may precede the visit row
    (retention purges a partition with an arrival only). A failure must not keep the patient
    from the visit."""
    from connector_core.domain.waiting import patient_arrival

    try:
        container.visits.record_patient_arrival(key, patient_arrival(at))
    except ConnectorError as error:
        _warn_failed("launch.arrival_not_recorded", error, visit_key=key)


# The arrival upsert runs beside the visit read (the storage clients are thread-safe), so a
# patient whose visit this worker has not seen waits one round trip, not two. Each task is
# waited for by its launch, so at most one per launch in flight.
_ARRIVALS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="launch-arrival")


def _visit_and_arrival(container: Container, key: str, at: datetime) -> Visit | None:
    """The visit (None: not yet), read while the patient's arrival is recorded; both done
    when this returns."""
    context = contextvars.copy_context()  # the launch's correlation id in a failure's log
    recorded = _ARRIVALS.submit(context.run, _record_arrival, container, key, at)
    try:
        return _get_visit(container, key)
    finally:
        recorded.result()


def _visit_practitioners(
    container: Container,
    smart: SmartConfiguration,
    tokens: SmartTokenResponse,
    context: LaunchContext,
) -> list[str]:
    """The visit's practitioners ("Practitioner/id"), primary performer first, read from the
    Appointment (or Encounter) with the patient's token. Empty when it cannot be read."""
    reference = context.appointment or context.encounter
    if reference is None:
        return []
    try:
        resource = container.smart.read_resource(
            smart.fhir_base_url, reference, access_token=tokens.access_token
        )
    except ConnectorError as error:  # EHR failure or a refused endpoint: the patient waits
        log_event(
            _log,
            "launch.fhir_read_failed",
            level=logging.WARNING,
            status=error.extra.get("ehrStatus", "-"),
        )
        return []
    return _practitioners_in(resource)[:3]


def _practitioners_in(resource: Mapping[str, Any]) -> list[str]:
    rtype = resource.get("resourceType")
    primary: list[str] = []
    others: list[str] = []
    try:
        if rtype == "Appointment":
            from fhir.resources.R4B.appointment import Appointment

            appointment = Appointment.model_validate(resource)
            for participant in appointment.participant or []:
                ref = parse_reference(
                    participant.actor.reference if participant.actor else None,
                    expected=("Practitioner",),
                )
                codes = {c.code for t in participant.type or [] for c in t.coding or [] if c.code}
                if ref:
                    (primary if codes & {"PPRF", "ATND"} else others).append(ref)
        elif rtype == "Encounter":
            from fhir.resources.R4B.encounter import Encounter

            encounter = Encounter.model_validate(resource)
            for member in encounter.participant or []:
                ref = parse_reference(
                    member.individual.reference if member.individual else None,
                    expected=("Practitioner",),
                )
                if ref:
                    others.append(ref)
    except ValueError:
        log_event(_log, "launch.fhir_resource_invalid", level=logging.WARNING, type=str(rtype))
        return []
    return list(dict.fromkeys(primary + others))


def poll_waiting(container: Container, *, cookies: Mapping[str, str]) -> LaunchResult:
    """The patient's waiting page asks again: the meeting, once the clinician has opened it."""
    sealed = cookies.get(WAIT_COOKIE)
    if not sealed:
        raise refusals.waiting_page_expired(cookie_missing=True)
    try:
        data = container.keyring.unseal("launch-wait", sealed)
    except AuthenticationError:
        raise refusals.waiting_page_expired(cookie_missing=False) from None
    key = str(data["vk"])
    join_url = container.launch_cache.join_url(key)
    if join_url is None:
        visit = _get_visit(container, key)
        if visit is None or not visit.join_web_url:
            return LaunchResult(waiting=True)
        join_url = visit.join_web_url
    log_event(_log, "launch.waiting_done", visit_key=key)
    url = _safe_location(container, guest_join_url(join_url), "meeting link")
    # The arrival as of the launch: the waiting page's time counts in the lobby wait.
    launched = data.get("at")
    _record_arrival(
        container,
        key,
        datetime.fromisoformat(launched) if isinstance(launched, str) else container.clock(),
    )
    return LaunchResult(redirect=url, cookies=(_delete(WAIT_COOKIE),))
