"""The pages patients and clinicians see, in their language: the error page of every browser
route (launch, EHR sign-in callback, live view), the patient's waiting page, the framed
"opening your visit" page, and the EHR sign-in confirmation.

These pages are self-contained (inline style, no external resource): the launch routes' CSP is
``default-src 'none'; style-src 'unsafe-inline'`` and EHRs show them in embedded browsers. The
language comes from ``?lang=``, the ``__Host-vv-lang`` cookie or ``Accept-Language``. What a
use case says in its error is shown translated when it said it as translatable texts (every
launch refusal with a ``reason``: ``connector_core.service.launch_messages``); any other
``detail``/``action`` is English and is marked ``lang="en"`` on a page in another language, so
screen readers pronounce it right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

from connector_core.errors import (
    AuthenticationError,
    ConcurrencyConflictError,
    ConflictError,
    ConnectorError,
    DependencyError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionRequiredError,
    StorageUnavailableError,
)
from connector_core.service.portal_web import i18n
from connector_core.service.portal_web.i18n import N_
from connector_core.service.portal_web.render import render
from connector_core.service.portal_web.web import parse_cookies

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DEFAULT_ERROR_TITLE",
    "ERROR_TITLES",
    "continue_html",
    "error_html",
    "error_title",
    "locale_for",
    "signin_done_html",
    "waiting_html",
]

ERROR_TITLES: dict[type[ConnectorError], str] = {
    AuthenticationError: N_("Sign-in needed"),
    PermissionDeniedError: N_("Not allowed"),
    NotFoundError: N_("Not found"),
    PayloadTooLargeError: N_("The request is too large"),
    InvalidInputError: N_("Something in the request is not right"),
    ConflictError: N_("Already exists"),
    InvalidStateError: N_("Not possible right now"),
    ConcurrencyConflictError: N_("Changed in the meantime"),
    PreconditionRequiredError: N_("Changed in the meantime"),
    StorageUnavailableError: N_("Temporarily unavailable"),
    DependencyError: N_("A service the connector depends on failed"),
}
DEFAULT_ERROR_TITLE = N_("Something went wrong")
_DEFAULT_ACTION = N_(
    "Go back to the EHR and try again. If it keeps happening, contact your administrator and "
    "give them the reference below."
)
_UNEXPECTED = N_("The request could not be completed because of an unexpected error.")
_WAIT_PATH = "/api/launch/wait"


def error_title(error: ConnectorError | None) -> str:
    """The msgid of the page title for ``error`` (the most specific class that has one)."""
    if error is None:
        return DEFAULT_ERROR_TITLE
    for kind in type(error).__mro__:
        if kind in ERROR_TITLES:
            return ERROR_TITLES[kind]
    return DEFAULT_ERROR_TITLE


def locale_for(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, bool]:
    """``(locale, chosen)``: ``chosen`` when ``?lang=`` picked it (kept in links and refresh)."""
    requested = params.get("lang")
    cookies = parse_cookies(headers.get("cookie", "") or "")
    locale = i18n.negotiate(
        accept_language=headers.get("accept-language", "") or "",
        cookie=cookies.get(i18n.LANG_COOKIE),
        requested=requested,
    )
    return locale, bool(requested) and locale == i18n.negotiate(requested=requested)


def error_html(*, locale: str, error: ConnectorError | None, correlation_id: str) -> str:
    action = error.extra.get("action") if error is not None else None
    message = error.detail if error is not None else None
    texts = error.texts if error is not None else None
    if texts is not None:  # said as translatable texts: in the page's language
        gettext = i18n.translations(locale).gettext
        message = texts[0].translate(gettext)
        action = texts[1].translate(gettext) if texts[1] is not None else None
    return render(
        "public_error.html",
        locale,
        title=error_title(error),
        intro=None if error is not None else _UNEXPECTED,
        message=message,
        action=str(action) if action else None,
        english=texts is None,
        default_action=_DEFAULT_ACTION,
        correlation_id=correlation_id,
        script="",
        switch=(),
        locale_names=i18n.LOCALE_NAMES,
    )


def _markup(script: str) -> object:
    from markupsafe import Markup

    return Markup(script)  # noqa: S704 - built by the launch function: a nonce'd, JSON-escaped script


def waiting_html(
    *, locale: str, chosen: bool, refresh_seconds: int, script: str, correlation_id: str
) -> str:
    """The patient's waiting page: its script asks ``/api/launch/wait`` in the background and
    goes to the visit when it is ready (without script, a meta refresh in ``<noscript>``; in the
    same language when one was picked with the switch)."""
    target = _WAIT_PATH + (f"?{urlencode({'lang': locale})}" if chosen else "")
    return render(
        "public_waiting.html",
        locale,
        title=N_("Your video visit will start soon"),
        refresh=f"{refresh_seconds};url={target}",
        script=_markup(script),
        correlation_id=correlation_id,
        switch=[(code, f"{_WAIT_PATH}?{urlencode({'lang': code})}") for code in i18n.LOCALES],
        locale_names=i18n.LOCALE_NAMES,
    )


def continue_html(*, locale: str, redirect: str, script: str, correlation_id: str) -> str:
    return render(
        "public_continue.html",
        locale,
        title=N_("Opening your video visit"),
        redirect=redirect,
        script=_markup(script),
        correlation_id=correlation_id,
        switch=(),
        locale_names=i18n.LOCALE_NAMES,
    )


def signin_done_html(*, locale: str, correlation_id: str) -> str:
    return render(
        "public_done.html",
        locale,
        title=N_("EHR sign-in complete"),
        script="",
        correlation_id=correlation_id,
        switch=(),
        locale_names=i18n.LOCALE_NAMES,
    )
