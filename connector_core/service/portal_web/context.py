"""The context every portal page runs in: language, session, security headers, CSRF checks,
friendly error pages, and the portal's adapters (sessions, Entra sign-in, directory search).

Every page: language negotiated (``?lang=`` switch, cookie, ``Accept-Language``), session looked
up from the sealed cookie (idle/absolute timeouts), security headers and a strict
Content-Security-Policy (scripts and styles only from ``/api/portal/static``; forms post only to
the portal itself, and on a config page also to its EHR's authorization server for the
approver's EHR sign-in). Every POST needs the session's CSRF token and a same-site request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from connector_core.errors import (
    AuthenticationError,
    ConnectorError,
    NotFoundError,
    PermissionDeniedError,
)
from connector_core.logs import correlation_id, get_logger, log_event
from connector_core.service.portal_web import i18n
from connector_core.service.portal_web.i18n import N_
from connector_core.service.portal_web.public import DEFAULT_ERROR_TITLE, error_title
from connector_core.service.portal_web.render import PORTAL_PATH, render
from connector_core.service.portal_web.sessions import (
    SESSION_COOKIE,
    PortalSession,
    SessionLookup,
    SessionStore,
    csrf_token,
    is_same_site,
    valid_csrf,
)
from connector_core.service.portal_web.web import WebRequest, WebResponse, redirect

if TYPE_CHECKING:
    from connector_core.adapters.graph_directory import DirectorySearch
    from connector_core.adapters.portal_signin import PortalSignIn
    from connector_core.bootstrap import Container

__all__ = [
    "ID_RE",
    "NOTICES",
    "NeedsSignin",
    "Page",
    "PortalAdapters",
    "adapters_for",
    "config_id_of",
    "error_page",
    "failure_page",
    "guard",
    "install_adapters",
    "open_page",
    "require_post",
    "require_session",
    "signin_page",
]

ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_log = get_logger("portal.web")

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # Same-origin: the portal's own forms keep a real Origin header (no-referrer makes it
    # "null"), and the EHR or Entra never learn which portal page sent the browser.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Vary": "Cookie, Accept-Language",
}

# Notices named in the query string after a redirect (post/redirect/get): fixed messages only.
NOTICES: dict[str, tuple[str, str]] = {
    "created": ("success", N_("Configuration created. The approver can now sign in to approve.")),
    "updated": ("success", N_("Configuration saved. It needs a new approval.")),
    "unchanged": ("info", N_("Nothing changed.")),
    "deleted": ("success", N_("Configuration deleted. Its launch URLs no longer work.")),
    "ehrSignin": (
        "success",
        N_("Your EHR sign-in was recorded. Approve the configuration within 30 minutes."),
    ),
    "approved": ("success", N_("Approved. Enter the integration records below in the EHR.")),
    "stale": (
        "warning",
        N_("Someone changed this configuration since you opened it. Review it and try again."),
    ),
    "needsEhrSignin": (
        "warning",
        N_("Sign in to the EHR first: approval needs an EHR sign-in in the last 30 minutes."),
    ),
    "signedOut": ("info", N_("You signed out of the configuration portal.")),
    "expired": ("warning", N_("Your session expired. Sign in again to continue.")),
    "ehrSigninSignedOut": (
        "success",
        N_("EHR sign-in complete. Sign in to the portal to approve the configuration."),
    ),
}


# --- adapters (one set per container) ----------------------------------------------------------


@dataclass
class PortalAdapters:
    sessions: SessionStore
    signin: PortalSignIn
    directory: DirectorySearch

    def graph_token(self, session: PortalSession) -> str:
        """The signed-in user's delegated Graph token from the session's msal cache (kept again
        when msal refreshed it); ``AuthenticationError`` without one (callers check first, to
        say so their own way), ``DependencyError`` as msal's."""
        if not session.home_account_id or not session.token_cache:
            raise AuthenticationError("Sign in again to use Microsoft Graph.")
        token, cache = self.signin.graph_token(
            tenant_id=session.caller.tenant_id,
            home_account_id=session.home_account_id,
            token_cache=session.token_cache,
        )
        if cache is not None:
            self.sessions.save_token_cache(session, cache)
        return token


_installed: tuple[Container, PortalAdapters] | None = None


def install_adapters(container: Container, adapters: PortalAdapters | None) -> None:
    """Use these adapters for ``container`` (tests with fakes); None builds them again."""
    global _installed
    _installed = (container, adapters) if adapters is not None else None


def adapters_for(root: Container) -> PortalAdapters:
    global _installed
    if _installed is not None and _installed[0] is root:
        return _installed[1]
    from connector_core.adapters.graph_directory import DirectorySearch
    from connector_core.adapters.portal_signin import PortalSignIn

    settings = root.settings
    adapters = PortalAdapters(
        sessions=SessionStore(root.store, root.keyring, region=settings.region),
        signin=PortalSignIn(settings),
        directory=DirectorySearch(http=root.http, graph_base_url=settings.graph_base_url),
    )
    _installed = (root, adapters)
    return adapters


# --- the page context ------------------------------------------------------------------------


@dataclass
class Page:
    root: Container
    req: WebRequest
    locale: str
    lookup: SessionLookup
    cookies: list[str] = field(default_factory=list)

    @property
    def session(self) -> PortalSession | None:
        return self.lookup.session

    def t(self, message: str, **values: Any) -> str:
        return i18n.gettext(self.locale, message, **values)

    def _finish(self, response: WebResponse) -> WebResponse:
        response.set_cookies.extend(self.cookies)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def html(
        self,
        template: str,
        *,
        status: int = 200,
        form_targets: Iterable[str] = (),
        **context: Any,
    ) -> WebResponse:
        session = self.session
        notices = [
            (NOTICES[name][0], NOTICES[name][1])
            for name in context.pop("notices", ())
            if name in NOTICES
        ]
        body = render(
            template,
            self.locale,
            user=session.caller if session else None,
            csrf=csrf_token(self.root.keyring, session.sid) if session else "",
            notices=notices,
            switch_url=self._switch_url,
            correlation_id=correlation_id(),
            region=self.root.settings.region.value,
            **context,
        )
        targets = " ".join(dict.fromkeys(form_targets))
        csp = _CSP + (f" {targets}" if targets else "")
        return self._finish(
            WebResponse(
                status=status,
                body=body,
                headers={"Cache-Control": "no-store", "Content-Security-Policy": csp},
            )
        )

    def _switch_url(self, locale: str) -> str:
        """This page in another language (GET pages only; a POST result goes home)."""
        path = self.req.path if self.req.method == "GET" else PORTAL_PATH
        query = {k: v for k, v in self.req.query.items() if k in _KEPT_QUERY}
        query["lang"] = locale
        return f"{path}?{urlencode(query)}"

    def redirect(self, location: str, *, status: int = 303) -> WebResponse:
        return self._finish(redirect(location, status=status))

    def json(self, body: Any, status: int = 200) -> WebResponse:
        import json

        return self._finish(
            WebResponse(
                status=status,
                body=json.dumps(body, separators=(",", ":")),
                content_type="application/json; charset=utf-8",
                headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP},
            )
        )


_KEPT_QUERY = frozenset({"configId"})


def open_page(root: Container, req: WebRequest) -> Page:
    requested = req.query.get("lang")
    locale = i18n.negotiate(
        accept_language=req.header("accept-language"),
        cookie=req.cookies.get(i18n.LANG_COOKIE),
        requested=requested,
    )
    cookies: list[str] = []
    if requested and locale == i18n.negotiate(requested=requested):
        cookies.append(i18n.language_cookie(locale))
    lookup = adapters_for(root).sessions.lookup(req.cookies.get(SESSION_COOKIE), now=root.clock())
    if lookup.set_cookie:
        cookies.append(lookup.set_cookie)
    return Page(root=root, req=req, locale=locale, lookup=lookup, cookies=cookies)


def signin_page(page: Page, *, notices: Iterable[str] = (), status: int = 200) -> WebResponse:
    wanted = list(notices)
    if page.lookup.expired and "expired" not in wanted:
        wanted.append("expired")
    return page.html("signin.html", status=status, notices=wanted, title=N_("Sign in"))


class NeedsSignin(Exception):
    """No live session: answer with the sign-in page (GET) or 401 (POST, JSON)."""


def require_session(page: Page) -> PortalSession:
    if page.session is None:
        raise NeedsSignin
    return page.session


def require_post(page: Page) -> PortalSession:
    """A state-changing request: a live session, the session's CSRF token, same site."""
    session = require_session(page)
    same_site = is_same_site(page.req.headers, page.root.settings.public_url)
    if not same_site or not valid_csrf(page.root.keyring, session, page.req.form.get("csrf")):
        log_event(_log, "portal.csrf_refused", level=30, same_site=same_site)
        raise PermissionDeniedError(
            "This form did not come from your portal session (its security token is missing, "
            "wrong or from an older session), so nothing was changed.",
            action="Go back to the configuration portal, reload the page and try again.",
            csrf=True,
        )
    return session


def config_id_of(page: Page) -> str:
    config_id = page.req.route.get("id", "")
    if not ID_RE.match(config_id):
        raise NotFoundError("No such configuration.")
    return config_id


def guard(
    handler: Callable[[Page], WebResponse],
) -> Callable[[Container, WebRequest], WebResponse]:
    """Runs a page; no session -> the sign-in page (or 401 JSON for the directory search)."""

    def run(root: Container, req: WebRequest) -> WebResponse:
        page = open_page(root, req)
        try:
            return handler(page)
        except NeedsSignin:
            if req.path.endswith("/directory"):
                return page.json({"error": page.t(N_("Your session expired. Sign in again."))}, 401)
            if req.method == "GET":
                return signin_page(page)
            return signin_page(page, notices=["expired"], status=401)
        except ConnectorError as error:
            return error_page(page, error)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def error_page(page: Page, error: ConnectorError) -> WebResponse:
    """A friendly page: what happened, what to do, the correlation id (never a trace)."""
    title = error_title(error)
    log_event(
        _log,
        "portal.page_failed",
        level=40 if error.http_status >= 500 else 20,
        error=type(error).__name__,
        status=error.http_status,
    )
    action = error.extra.get("action")
    return page.html(
        "error.html",
        status=error.http_status,
        title=title,
        detail=error.detail,
        action=str(action) if action else None,
        csrf_failure=bool(error.extra.get("csrf")),
    )


def failure_page(root: Container, req: WebRequest, error: ConnectorError | None) -> WebResponse:
    """The error page outside a page's own handling: a bad request body, or a bug (500)."""
    page = open_page(root, req)
    if error is not None:
        return error_page(page, error)
    return page.html(
        "error.html",
        status=500,
        title=DEFAULT_ERROR_TITLE,
        detail=None,
        action=None,
        csrf_failure=False,
    )
