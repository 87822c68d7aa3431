"""The portal's pages, one function per route, over the same use cases as the JSON API
(:mod:`connector_core.service.configs`); :mod:`.context` gives each its language, session,
security headers and CSRF checks. State changes answer ``303 See Other`` (post/redirect/get);
outcomes are shown from fixed notices named in the query string, never from text taken from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from connector_core.errors import (
    AuthenticationError,
    ConcurrencyConflictError,
    ConflictError,
    ConnectorError,
    DependencyError,
    InvalidInputError,
    InvalidStateError,
    PermissionDeniedError,
    PreconditionRequiredError,
)
from connector_core.logs import get_logger, log_event
from connector_core.service.portal_web.context import (
    ID_RE,
    NOTICES,
    Page,
    PortalAdapters,
    adapters_for,
    config_id_of,
    error_page,
    failure_page,
    guard,
    install_adapters,
    require_post,
    require_session,
    signin_page,
)
from connector_core.service.portal_web.i18n import N_
from connector_core.service.portal_web.render import PORTAL_PATH, static_file
from connector_core.service.portal_web.reports_page import reports, reports_export
from connector_core.service.portal_web.sessions import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    SIGNIN_TTL_SECONDS,
    clear_cookie,
)
from connector_core.service.portal_web.web import WebRequest, WebResponse

if TYPE_CHECKING:
    from connector_core.bootstrap import Container
    from connector_core.domain.models import TenantConfig, Versioned
    from connector_core.service.portal_models import Caller, ConfigInput

__all__ = [
    "PortalAdapters",
    "approve",
    "config_delete",
    "config_detail",
    "config_edit",
    "config_history",
    "config_new",
    "config_save",
    "directory_search",
    "ehr_signin",
    "error_page",
    "failure_page",
    "home",
    "install_adapters",
    "reports",
    "reports_export",
    "signin_callback",
    "signin_start",
    "signout",
    "static_asset",
]

_UPN_HINT_RE = re.compile(r"^[^@\s]{1,128}@[A-Za-z0-9.-]{1,255}$")
_SIGNIN_PURPOSE = "portal-signin"
_log = get_logger("portal.web")

# The FHIR base URL checks of the API (adapters/fhir_probe.py), by code: a short heading in the
# page's language above the check's own message.
URL_CHECKS: dict[str, str] = {
    "url-syntax": N_("This is not a valid URL."),
    "url-scheme": N_("The URL must start with https://."),
    "url-unresolvable": N_("The server name could not be found."),
    "url-target": N_("The URL points to an address the connector may not call."),
    "smart-discovery-unreachable": N_("The server's SMART configuration could not be read."),
    "smart-discovery-invalid": N_("The server's SMART configuration is not usable."),
    "pkce-s256-unsupported": N_("The server does not support PKCE with S256."),
    "fhir-metadata-unreachable": N_("The server's FHIR capability statement could not be read."),
    "fhir-version-dstu2": N_("This is a FHIR DSTU2 endpoint; the connector needs FHIR R4."),
    "fhir-version-not-r4": N_("This FHIR endpoint is not FHIR R4."),
}

ENVIRONMENTS = (("test", N_("Test")), ("production", N_("Production")))
LANDINGS = (
    ("visit-page", N_("The visit page: opens the meeting and shows who is here and who waits")),
    ("meeting", N_("Straight into the meeting")),
)
VENDORS = (
    ("epic", N_("Epic")),
    ("oracle", N_("Oracle Health (Cerner Millennium)")),
    ("smart", N_("Another SMART on FHIR EHR")),
)
STATUSES = {"pending_approval": N_("Waiting for approval"), "approved": N_("Approved")}
HISTORY_ACTIONS = {
    "created": N_("Created"),
    "updated": N_("Changed"),
    "ehr_signin": N_("Signed in to the EHR"),
    "approved": N_("Approved"),
}
FIELD_NAMES = {
    "fhir_base_url": N_("FHIR base URL"),
    "approver_upn": N_("Approver"),
    "environment": N_("Environment"),
    "ehr_vendor": N_("EHR"),
    "smart_client_id": N_("Client ID at the EHR"),
    "provider_landing": N_("Clinician lands on"),
    "ehr_endpoint_hosts": N_("EHR endpoint hosts"),
}


# --- sign-in and sign-out ----------------------------------------------------------------------


@guard
def home(page: Page) -> WebResponse:
    """``GET /api/portal``: the tenant's configurations, or the sign-in page."""
    query = page.req.query
    signed_in_ehr = query.get("ehrSignin") == "ok"
    if page.session is None:
        notices = ["ehrSigninSignedOut"] if signed_in_ehr else []
        notices += [n for n in ("signedOut",) if query.get(n)]
        return signin_page(page, notices=notices)
    config_id = query.get("configId", "")
    if signed_in_ehr and ID_RE.match(config_id):  # back from the EHR sign-in
        return page.redirect(f"{PORTAL_PATH}/configs/{config_id}?ehrSignin=1")
    from connector_core.service import configs as service

    caller = page.session.caller
    items = service.list_configs(page.root, caller)
    rows = [_row(page.root, v.record, caller) for v in items]
    return page.html(
        "configs.html",
        title=N_("Configurations"),
        rows=rows,
        is_admin=caller.is_admin,
        notices=[n for n in ("deleted",) if query.get(n)],
    )


def _redirect_uri(root: Container) -> str:
    return f"{root.settings.api_base_url}/portal/signin-callback"


@guard
def signin_start(page: Page) -> WebResponse:
    """``GET /api/portal/signin``: to Microsoft Entra ID (authorization code + PKCE)."""
    hint = page.req.query.get("hint", "")
    url, flow = adapters_for(page.root).signin.start(
        redirect_uri=_redirect_uri(page.root),
        login_hint=hint if _UPN_HINT_RE.match(hint) else None,
    )
    sealed = page.root.keyring.seal(_SIGNIN_PURPOSE, {"flow": flow}, ttl_seconds=SIGNIN_TTL_SECONDS)
    # The cookie outlives its sealed value, so a late answer says "expired", not "another
    # browser"
    page.cookies.append(
        f"{SIGNIN_COOKIE}={sealed}; Max-Age={2 * SIGNIN_TTL_SECONDS}; "
        "Path=/; Secure; HttpOnly; SameSite=Lax"
    )
    return page.redirect(url, status=302)


_SIGNIN_AGAIN = "Sign in to the configuration portal again."


def _signin_nonce(root: Container, state: str) -> str:
    return f"portal-signin-{root.keyring.keyed_hash('portal-signin-state', state)}"


def _signin_refusal(root: Container, sealed: str, state: str) -> ConnectorError:
    """Why a sign-in answer has no usable flow cookie: expired, already used, or another browser
    (error path only: at most one table read)."""
    if sealed:
        try:
            root.keyring.unseal(_SIGNIN_PURPOSE, sealed, now=0.0)
        except AuthenticationError:
            pass
        else:
            return AuthenticationError(
                "This sign-in took longer than 10 minutes and has expired.",
                action=_SIGNIN_AGAIN,
                reason="state_expired",
            )
    if state and len(state) <= 512 and root.nonces.was_consumed(_signin_nonce(root, state)):
        return InvalidStateError(
            "This sign-in was already completed; its link works only once (a reload of the page "
            "after signing in, for example).",
            action="Open the configuration portal: you are signed in.",
            reason="state_used",
        )
    return AuthenticationError(
        "This sign-in did not start in this browser, or the browser blocked its cookie.",
        action="Sign in again from this browser, with cookies allowed for this site.",
        reason="other_browser",
    )


@guard
def signin_callback(page: Page) -> WebResponse:
    """``GET /api/portal/signin-callback``: completes the sign-in, starts a session."""
    from connector_core.service import configs as service

    root, query = page.root, page.req.query
    page.cookies.append(clear_cookie(SIGNIN_COOKIE))
    sealed = page.req.cookies.get(SIGNIN_COOKIE, "")[:8192]
    try:
        flow = root.keyring.unseal(_SIGNIN_PURPOSE, sealed)["flow"]
    except (AuthenticationError, KeyError):
        raise _signin_refusal(root, sealed, str(query.get("state") or "")) from None
    if query.get("error"):
        code = re.sub(r"[^A-Za-z0-9_.-]", "", query["error"])[:40] or "error"
        raise AuthenticationError(
            f"Microsoft sign-in did not complete ({code}).", action=_SIGNIN_AGAIN
        )
    state = str(flow.get("state", ""))
    try:
        root.nonces.consume(
            _signin_nonce(root, state),
            expires_at=root.clock() + timedelta(seconds=SIGNIN_TTL_SECONDS),
        )
    except ConflictError:
        raise InvalidStateError(
            "This sign-in was already completed; its link works only once.", action=_SIGNIN_AGAIN
        ) from None
    adapters = adapters_for(root)
    tokens = adapters.signin.complete(
        flow=flow, auth_response={k: v for k, v in query.items() if isinstance(v, str)}
    )
    caller = service.authenticate(root, f"Bearer {tokens.access_token}")
    if caller.tenant_id != tokens.tenant_id:
        raise AuthenticationError("The Microsoft sign-in answered for another organization.")
    if page.session is not None:  # a new sign-in replaces the old session (no fixation)
        adapters.sessions.delete(page.session.sid)
    now = root.clock()
    session = adapters.sessions.create(
        caller=caller,
        now=now,
        home_account_id=tokens.home_account_id,
        token_cache=tokens.token_cache,
    )
    page.cookies.append(adapters.sessions.cookie(session, now=now))
    log_event(
        _log,
        "portal.signed_in",
        tenant_id=caller.tenant_id,
        admin=caller.is_admin,
    )
    return page.redirect(PORTAL_PATH)


@guard
def signout(page: Page) -> WebResponse:
    """``POST /api/portal/signout``: ends the session here (the record is deleted)."""
    session = require_post(page)
    adapters_for(page.root).sessions.delete(session.sid)
    page.cookies.append(clear_cookie(SESSION_COOKIE))
    log_event(_log, "portal.signed_out", tenant_id=session.caller.tenant_id)
    return page.redirect(f"{PORTAL_PATH}?signedOut=1")


# --- configurations ---------------------------------------------------------------------------


def _row(root: Container, config: TenantConfig, caller: Caller) -> dict[str, Any]:
    return {
        "id": config.id,
        "environment": dict(ENVIRONMENTS)[config.environment.value],
        "environment_key": config.environment.value,
        "fhir_base_url": config.fhir_base_url,
        "vendor": dict(VENDORS)[config.ehr_vendor.value],
        "approver": config.approver_upn,
        "status": STATUSES[config.status.value],
        "status_key": config.status.value,
        "yours": config.approver_matches(upn=caller.upn, oid=caller.object_id),
    }


def _form_values(source: Mapping[str, str] | None, config: TenantConfig | None) -> dict[str, str]:
    if source is not None:
        return {
            "fhirBaseUrl": source.get("fhirBaseUrl", ""),
            "approverUpn": source.get("approverUpn", ""),
            "environment": source.get("environment", "test"),
            "ehrVendor": source.get("ehrVendor", "smart"),
            "smartClientId": source.get("smartClientId", ""),
            "providerLanding": source.get("providerLanding", "visit-page"),
        }
    if config is not None:
        return {
            "fhirBaseUrl": config.fhir_base_url,
            "approverUpn": config.approver_upn,
            "environment": config.environment.value,
            "ehrVendor": config.ehr_vendor.value,
            "smartClientId": config.smart_client_id or "",
            "providerLanding": config.provider_landing.value,
        }
    return {
        "fhirBaseUrl": "",
        "approverUpn": "",
        "environment": "test",
        "ehrVendor": "epic",
        "smartClientId": "",
        "providerLanding": "visit-page",
    }


def _form_page(
    page: Page,
    *,
    config: Versioned[TenantConfig] | None,
    values: dict[str, str],
    error: ConnectorError | None = None,
    status: int = 200,
    notices: Iterable[str] = (),
) -> WebResponse:
    from connector_core.service.configs import http_etag

    field_errors: dict[str, str] = {}
    check = None
    suggested = None
    existing = None
    if isinstance(error, InvalidInputError):
        for item in error.extra.get("errors") or []:
            name = str(item.get("field") or "")
            field_errors.setdefault(name or "form", str(item.get("message") or error.detail))
        if not field_errors:
            field_errors[str(error.extra.get("field") or "form")] = error.detail
        check = URL_CHECKS.get(str(error.extra.get("code") or ""))
        suggestion = error.extra.get("suggestedUrl")
        suggested = suggestion if isinstance(suggestion, str) and suggestion else None
    elif isinstance(error, ConflictError):
        field_errors["fhirBaseUrl"] = error.detail
        found = error.extra.get("existingId")
        existing = found if isinstance(found, str) and ID_RE.match(found) else None
    elif error is not None:
        field_errors["form"] = error.detail
    return page.html(
        "config_form.html",
        status=status,
        title=N_("Change the configuration") if config else N_("New configuration"),
        config_id=config.record.id if config else None,
        etag=http_etag(config) if config else "",
        values=values,
        errors=field_errors,
        url_check=check,
        suggested_url=suggested,
        existing_id=existing,
        environments=ENVIRONMENTS,
        vendors=VENDORS,
        landings=LANDINGS,
        field_names={
            "fhirBaseUrl": N_("FHIR base URL"),
            "approverUpn": N_("Approver"),
            "environment": N_("Environment"),
            "ehrVendor": N_("EHR"),
            "smartClientId": N_("Client ID at the EHR"),
            "providerLanding": N_("Clinician lands on"),
            "form": N_("Configuration"),
        },
        notices=list(notices),
    )


def _require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise PermissionDeniedError(
            "Registering and changing configurations needs the Connector.Admin app role.",
            action="Ask a Microsoft 365 administrator of your organization to assign you the "
            "Connector.Admin role for the connector's app, then sign in again.",
        )


@guard
def config_new(page: Page) -> WebResponse:
    """``GET /api/portal/configs/new``: the form for a new configuration (admins)."""
    session = require_session(page)
    _require_admin(session.caller)
    return _form_page(page, config=None, values=_form_values(None, None))


def _input(form: Mapping[str, str]) -> ConfigInput:
    from connector_core.service.portal_models import ConfigInput, parse_body

    suggested = form.get("useSuggested", "").strip()
    body: dict[str, Any] = {
        "fhirBaseUrl": suggested or form.get("fhirBaseUrl", "").strip(),
        "approverUpn": form.get("approverUpn", "").strip(),
        "environment": form.get("environment", ""),
        "ehrVendor": form.get("ehrVendor", "smart") or "smart",
        "providerLanding": form.get("providerLanding", "visit-page") or "visit-page",
    }
    client_id = form.get("smartClientId", "").strip()
    if client_id:
        body["smartClientId"] = client_id
    return parse_body(ConfigInput, body)


@guard
def config_save(page: Page) -> WebResponse:
    """``POST /api/portal/configs`` (create) and ``POST /api/portal/configs/{id}`` (change)."""
    from connector_core.service import configs as service

    session = require_post(page)
    caller = session.caller
    form = page.req.form
    values = _form_values(form, None)
    if form.get("useSuggested"):
        values["fhirBaseUrl"] = form["useSuggested"]
    config_id = page.req.route.get("id")
    current = None
    if config_id is not None:
        current = service.get_config(page.root, caller, config_id_of(page))
    try:
        body = _input(form)
        if current is None:
            created = service.create_config(page.root, caller, body)
            return page.redirect(f"{PORTAL_PATH}/configs/{created.record.id}?created=1")
        updated = service.update_config(
            page.root, caller, current.record.id, body, if_match=form.get("etag") or None
        )
        notice = "unchanged" if updated.etag == current.etag else "updated"
        return page.redirect(f"{PORTAL_PATH}/configs/{current.record.id}?{notice}=1")
    except (ConcurrencyConflictError, PreconditionRequiredError):
        assert current is not None
        return page.redirect(f"{PORTAL_PATH}/configs/{current.record.id}/edit?stale=1")
    except (InvalidInputError, ConflictError) as error:
        return _form_page(page, config=current, values=values, error=error, status=400)


@guard
def config_edit(page: Page) -> WebResponse:
    """``GET /api/portal/configs/{id}/edit``: the form, filled in (admins)."""
    from connector_core.service import configs as service

    session = require_session(page)
    _require_admin(session.caller)
    current = service.get_config(page.root, session.caller, config_id_of(page))
    return _form_page(
        page,
        config=current,
        values=_form_values(None, current.record),
        notices=[n for n in ("stale",) if page.req.query.get(n)],
    )


def _ehr_origins(config: TenantConfig) -> list[str]:
    """CSP ``form-action`` sources for the approver's EHR sign-in: the browser follows the
    portal's 303 to the EHR's authorize endpoint, which lives on the FHIR base URL's host or on
    a host recorded when the config was saved (its endpoint allowance)."""
    hosts = [urlsplit(config.fhir_base_url).hostname or "", *config.ehr_endpoint_hosts]
    return [f"{h}:*" for h in dict.fromkeys(hosts) if h and re.fullmatch(r"[A-Za-z0-9.-]+", h)]


@guard
def config_detail(page: Page) -> WebResponse:
    """``GET /api/portal/configs/{id}``: status, actions, and the integration records."""
    from connector_core.domain.models import APPROVAL_SIGNIN_WINDOW
    from connector_core.service import configs as service
    from connector_core.service.portal_web.records import records_for

    session = require_session(page)
    caller = session.caller
    current = service.get_config(page.root, caller, config_id_of(page))
    config = current.record
    view = service.config_view(page.root, config)
    is_approver = config.approver_matches(upn=caller.upn, oid=caller.object_id)
    now = page.root.clock()
    signed_in = (
        config.ehr_validated_at is not None
        and config.is_approver(config.ehr_validated_by)
        and now - config.ehr_validated_at <= APPROVAL_SIGNIN_WINDOW
    )
    query = page.req.query
    notices = [n for n in NOTICES if query.get(n) and n not in ("signedOut", "expired")]
    return page.html(
        "config.html",
        title=N_("Configuration"),
        form_targets=_ehr_origins(config) if is_approver else (),
        config=config,
        row=_row(page.root, config, caller),
        etag=service.http_etag(current),
        is_admin=caller.is_admin,
        is_approver=is_approver,
        approved=config.status.value == "approved",
        can_approve=is_approver and signed_in and config.status.value != "approved",
        signed_in=signed_in,
        groups=records_for(view, api_base_url=page.root.settings.api_base_url),
        notices=notices,
    )


@guard
def config_history(page: Page) -> WebResponse:
    """``GET /api/portal/configs/{id}/history``: who did what, when."""
    from connector_core.service import configs as service

    session = require_session(page)
    config_id = config_id_of(page)
    current = service.get_config(page.root, session.caller, config_id)
    changes = service.config_history(page.root, session.caller, config_id)
    entries = [
        {
            "at": change.at,
            "by": change.by,
            "action": HISTORY_ACTIONS.get(change.action, change.action),
            "fields": [FIELD_NAMES.get(f, f) for f in change.fields],
        }
        for change in reversed(changes)
    ]
    return page.html(
        "history.html",
        title=N_("History"),
        config=current.record,
        row=_row(page.root, current.record, session.caller),
        entries=entries,
    )


@guard
def config_delete(page: Page) -> WebResponse:
    """``GET`` asks for confirmation; ``POST`` deletes (admins)."""
    from connector_core.service import configs as service

    if page.req.method == "GET":
        session = require_session(page)
        _require_admin(session.caller)
        current = service.get_config(page.root, session.caller, config_id_of(page))
        return page.html(
            "delete.html",
            title=N_("Delete the configuration"),
            config=current.record,
            row=_row(page.root, current.record, session.caller),
            etag=service.http_etag(current),
        )
    session = require_post(page)
    config_id = config_id_of(page)
    try:
        service.delete_config(
            page.root, session.caller, config_id, if_match=page.req.form.get("etag") or None
        )
    except ConcurrencyConflictError:
        return page.redirect(f"{PORTAL_PATH}/configs/{config_id}?stale=1")
    return page.redirect(f"{PORTAL_PATH}?deleted=1")


# --- the approver ------------------------------------------------------------------------------


@guard
def ehr_signin(page: Page) -> WebResponse:
    """``POST /api/portal/configs/{id}/ehr-signin``: to the EHR's sign-in (SMART standalone
    launch); the EHR returns to ``/api/ehr-signin/callback``, which returns here."""
    from connector_core.service import configs as service

    session = require_post(page)
    started = service.start_ehr_signin(page.root, session.caller, config_id_of(page))
    return page.redirect(started.authorize_url)


@guard
def approve(page: Page) -> WebResponse:
    """``POST /api/portal/configs/{id}/approve``: approves the version the approver saw."""
    from connector_core.service import configs as service

    session = require_post(page)
    config_id = config_id_of(page)
    try:
        service.approve_config(
            page.root, session.caller, config_id, if_match=page.req.form.get("etag") or None
        )
    except ConcurrencyConflictError:
        return page.redirect(f"{PORTAL_PATH}/configs/{config_id}?stale=1")
    except InvalidStateError:
        return page.redirect(f"{PORTAL_PATH}/configs/{config_id}?needsEhrSignin=1")
    return page.redirect(f"{PORTAL_PATH}/configs/{config_id}?approved=1#records")


# --- the approver picker ----------------------------------------------------------------------


@guard
def directory_search(page: Page) -> WebResponse:
    """``POST /api/portal/directory`` (``q``, ``csrf``): people of the admin's directory
    matching ``q``, through Graph with the admin's delegated ``User.ReadBasic.All``. A POST so
    that what the admin types (often a name) stays out of URLs and request logs."""
    session = require_post(page)
    if not session.caller.is_admin:
        return page.json({"error": page.t(N_("Only admins can search the directory."))}, 403)
    adapters = adapters_for(page.root)
    if not session.home_account_id or not session.token_cache:
        return page.json({"error": page.t(N_("Sign in again to search the directory."))}, 401)
    try:
        token = adapters.graph_token(session)
        people = adapters.directory.search(token, page.req.form.get("q", ""))
    except (AuthenticationError, DependencyError) as error:
        log_event(_log, "portal.directory_failed", level=30, error=type(error).__name__)
        return page.json(
            {
                "error": page.t(
                    N_(
                        "The directory search is not available. Type the approver's user "
                        "principal name (for example analyst@contoso.com)."
                    )
                )
            },
            503,
        )
    return page.json(
        {"results": [{"upn": p.upn, "name": p.display_name, "mail": p.mail} for p in people]}
    )


# --- static files ------------------------------------------------------------------------------


def static_asset(root: Container, req: WebRequest) -> WebResponse:
    """``GET /api/portal/static/{name}``: CSS and scripts of the portal (from this package)."""
    found = static_file(req.route.get("name", ""))
    if found is None:
        return WebResponse(status=404, body="", content_type="text/plain; charset=utf-8")
    content, content_type, version = found
    fresh = req.query.get("v") == version
    return WebResponse(
        status=200,
        body=content,
        content_type=content_type,
        headers={
            "Cache-Control": "public, max-age=31536000, immutable" if fresh else "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Cross-Origin-Resource-Policy": "same-origin",
        },
    )
