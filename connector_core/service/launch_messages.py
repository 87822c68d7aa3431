"""What the launch pages (and the approver's EHR sign-in callback) say when they refuse, and what
to do next: each refusal has its ``reason`` code (docs/ehr-setup.md, "Troubleshooting") and full
English sentences that are msgids of the portal_web catalogs (babel.cfg extracts this module),
so the patient's or clinician's error page shows them in their language. Whole sentences per
variant, never pieced together, so each language can word them its own way."""

from __future__ import annotations

from enum import StrEnum

from connector_core.errors import (
    AuthenticationError,
    ConnectorError,
    EhrError,
    InvalidInputError,
    InvalidStateError,
    PermissionDeniedError,
)
from connector_core.texts import N_, Text, refusal

__all__ = [
    "EHR_ERROR_CODES",
    "Flow",
    "ehr_refused",
    "ehr_signin_expired",
    "ehr_signin_invalid",
    "ehr_signin_refused",
    "ehr_signin_used",
    "microsoft_signin_refused",
    "no_visit_context",
    "not_approved",
    "other_browser",
    "other_environment",
    "session_id_missing",
    "session_id_unfilled",
    "state_expired",
    "state_invalid",
    "state_used",
    "untrusted_iss",
    "waiting_page_expired",
]


class Flow(StrEnum):
    """Which answer a callback refused: the EHR's (launch) or Microsoft's (sign-in)."""

    LAUNCH = "launch"
    MICROSOFT = "microsoft"


CLICK_AGAIN = Text(N_("Go back to the EHR and click Start virtual visit again."))
RESTART = Text(N_("Start the visit again from the EHR."))

# --- the callbacks: expired, already used, another browser, not valid -----------------------

_EXPIRED = {
    Flow.LAUNCH: N_(
        "This launch has expired: the visit must open within 10 minutes of the click in the EHR."
    ),
    Flow.MICROSOFT: N_(
        "This Microsoft sign-in has expired: the visit must open within 10 minutes of the "
        "click in the EHR."
    ),
}
_USED = {
    Flow.LAUNCH: N_(
        "This launch link was already used: it opened the visit once (reloading the page or "
        "going back to it does not open it again)."
    ),
    Flow.MICROSOFT: N_(
        "This Microsoft sign-in answer was already used: it opened the visit once (reloading "
        "the page or going back to it does not open it again)."
    ),
}
_USED_ACTION = N_(
    "Go back to the EHR and click Start virtual visit again. Each click gives a new link."
)
_OTHER_BROWSER = {
    Flow.LAUNCH: N_(
        "This sign-in did not start in this browser: it started in another browser (or "
        "window), or this browser blocked the connector's cookie."
    ),
    Flow.MICROSOFT: N_(
        "This Microsoft sign-in did not start in this browser: it started in another browser "
        "(or window), or this browser blocked the connector's cookie."
    ),
}
_OTHER_BROWSER_ACTION = N_(
    "Go back to the EHR and click Start virtual visit again. Finish in the window that opens; "
    "if it keeps happening, allow cookies for the connector's site."
)
_INVALID = {
    Flow.LAUNCH: N_(
        "This sign-in answer is not valid: it was altered or is not from this connector."
    ),
    Flow.MICROSOFT: N_(
        "This Microsoft sign-in is not valid: its cookie was altered or is not from this connector."
    ),
}


def state_expired(flow: Flow = Flow.LAUNCH) -> AuthenticationError:
    return refusal(AuthenticationError, Text(_EXPIRED[flow]), CLICK_AGAIN, reason="state_expired")


def state_used(flow: Flow = Flow.LAUNCH) -> AuthenticationError:
    return refusal(AuthenticationError, Text(_USED[flow]), Text(_USED_ACTION), reason="state_used")


def other_browser(flow: Flow = Flow.LAUNCH) -> AuthenticationError:
    return refusal(
        AuthenticationError,
        Text(_OTHER_BROWSER[flow]),
        Text(_OTHER_BROWSER_ACTION),
        reason="other_browser",
    )


def state_invalid(flow: Flow = Flow.LAUNCH) -> AuthenticationError:
    return refusal(AuthenticationError, Text(_INVALID[flow]), CLICK_AGAIN, reason="state_invalid")


# --- setup mistakes --------------------------------------------------------------------------


def not_approved() -> InvalidStateError:
    return refusal(
        InvalidStateError,
        Text(
            N_(
                "This virtual-visit configuration is not approved yet (or was changed and "
                "waits for approval again), so the EHR's launch links for it do not work yet."
            )
        ),
        Text(
            N_(
                "Ask the configuration's approver to sign in to the EHR and approve it in the "
                "configuration portal, then click Start virtual visit again."
            )
        ),
        reason="not_approved",
    )


def session_id_missing() -> InvalidInputError:
    # Epic fills %CONFERENCEID% with nothing for a visit that is no group visit.
    return refusal(
        InvalidInputError,
        Text(
            N_(
                "The EHR sent no session id for this visit: the launch URL's sessionId is "
                "empty. The group-visit link (sessionId=%CONFERENCEID%) was used for a visit "
                "without a conference id, or the EHR has no value for the record's token."
            )
        ),
        Text(
            N_(
                "Start an ordinary visit with its own Start virtual visit button. If that "
                "button shows this page, ask your EHR analyst to check its integration record: "
                "sessionId=%CSN% on ordinary visits, sessionId=%CONFERENCEID% only on the "
                "group-visit record, as the configuration portal shows them."
            )
        ),
        reason="session_id_missing",
    )


def session_id_unfilled() -> InvalidInputError:
    return refusal(
        InvalidInputError,
        Text(
            N_(
                "The EHR did not fill in the visit's session id: the launch URL's sessionId is "
                "empty or still reads like %CONFERENCEID% or %CSN%."
            )
        ),
        Text(
            N_(
                "Ask your EHR analyst to check the integration record's launch URL: the "
                "group-visit record needs sessionId=%CONFERENCEID%, the others "
                "sessionId=%CSN%, exactly as the configuration portal shows them."
            )
        ),
        reason="session_id_unfilled",
    )


# (the launch URL's environment, the EHR's environment): one sentence per pair.
_OTHER_ENVIRONMENT = {
    ("test", "production"): (
        N_(
            "This launch URL belongs to your test configuration, but the EHR opened it from "
            "its production environment."
        ),
        N_(
            "Ask your EHR analyst to use, in the production environment, the launch URLs of "
            "the production configuration (the configuration portal lists both)."
        ),
    ),
    ("production", "test"): (
        N_(
            "This launch URL belongs to your production configuration, but the EHR opened it "
            "from its test environment."
        ),
        N_(
            "Ask your EHR analyst to use, in the test environment, the launch URLs of the test "
            "configuration (the configuration portal lists both)."
        ),
    ),
}


def other_environment(here: str, there: str) -> PermissionDeniedError:
    """The launch URL of the tenant's other environment (test in production or the reverse)."""
    pair = _OTHER_ENVIRONMENT.get((here, there))
    if pair is None:  # only these two environments exist; another would show in English
        return PermissionDeniedError(
            f"This launch URL belongs to your {here} configuration, but the EHR opened it from "
            f"its {there} environment.",
            action=f"Ask your EHR analyst to use, in the {there} environment, the launch URLs "
            f"of the {there} configuration (the configuration portal lists both).",
            reason="other_environment",
        )
    return refusal(PermissionDeniedError, Text(pair[0]), Text(pair[1]), reason="other_environment")


def untrusted_iss() -> PermissionDeniedError:
    return refusal(
        PermissionDeniedError,
        Text(
            N_("This launch came from an EHR that this virtual-visit configuration does not trust.")
        ),
        Text(
            N_(
                "Ask your EHR analyst to check that the launch URL in the EHR belongs to this "
                "EHR environment (test or production)."
            )
        ),
        reason="untrusted_iss",
    )


def no_visit_context() -> InvalidInputError:
    return refusal(
        InvalidInputError,
        Text(
            N_(
                "The EHR did not say which visit this is (no appointment, encounter or "
                "conference id in the launch context)."
            )
        ),
        Text(
            N_(
                "Start the virtual visit from the appointment in the EHR. If it keeps "
                "happening, ask your EHR analyst to include the appointment in the launch "
                "context."
            )
        ),
        reason="no_visit_context",
    )


# --- the answer says the sign-in failed (an OAuth error code) --------------------------------

_EHR_ERRORS = {
    "access_denied": N_("The EHR did not allow the connector to start the visit (access denied)."),
    "invalid_scope": N_("The EHR did not grant the access the connector asks for (invalid scope)."),
    "unauthorized_client": N_(
        "The EHR does not allow the connector's client to sign in (unauthorized client)."
    ),
    "temporarily_unavailable": N_("The EHR is temporarily unavailable."),
    "server_error": N_("The EHR had an internal error."),
    "invalid_request": N_("The EHR refused the sign-in request (invalid request)."),
}
_EHR_ERROR_OTHER = N_("The EHR could not complete the sign-in.")
EHR_ERROR_CODES = frozenset(_EHR_ERRORS)  # the OAuth error codes with a sentence of their own


def ehr_refused(code: str) -> ConnectorError:
    """The EHR answered the launch with ``error=code`` (reason ``ehr_refused``)."""
    message = Text(_EHR_ERRORS.get(code, _EHR_ERROR_OTHER))
    if code == "access_denied":
        action = N_(
            "If you declined, start the visit again and allow it. Otherwise ask your EHR "
            "analyst to check the connector's access in the EHR."
        )
        return refusal(PermissionDeniedError, message, Text(action), reason="ehr_refused")
    if code == "invalid_request":  # e.g. a launch value the EHR never issued: the request
        return refusal(InvalidInputError, message, RESTART, reason="ehr_refused")
    return refusal(EhrError, message, RESTART, reason="ehr_refused")


def microsoft_signin_refused(code: str) -> AuthenticationError:
    """Microsoft answered the clinician's sign-in with ``error=code`` (shown as it came)."""
    return refusal(
        AuthenticationError,
        Text(N_("Microsoft sign-in did not complete (%(code)s)."), {"code": code}),
        Text(
            N_(
                "Start the visit again from the EHR and sign in with your work account. If "
                "your account is disabled, contact your administrator."
            )
        ),
        reason="microsoft_signin_refused",
    )


# --- the patient's waiting page --------------------------------------------------------------

_FROM_MYCHART = N_("Open the visit again from MyChart.")


def waiting_page_expired(*, cookie_missing: bool) -> AuthenticationError:
    message = (
        N_("This waiting page has expired or was opened in another browser.")
        if cookie_missing
        else N_("This waiting page has expired.")
    )
    return refusal(
        AuthenticationError, Text(message), Text(_FROM_MYCHART), reason="waiting_expired"
    )


# --- the approver's EHR sign-in (portal) -----------------------------------------------------

_EHR_SIGNIN_AGAIN = Text(N_("Start the EHR sign-in again from the configuration portal."))


def ehr_signin_invalid() -> AuthenticationError:
    return refusal(
        AuthenticationError,
        Text(
            N_(
                "This EHR sign-in answer is not valid: it was altered or was not issued by this "
                "connector."
            )
        ),
        _EHR_SIGNIN_AGAIN,
        reason="state_invalid",
    )


def ehr_signin_expired() -> AuthenticationError:
    return refusal(
        AuthenticationError,
        Text(N_("This EHR sign-in has expired: it must be completed within 10 minutes.")),
        _EHR_SIGNIN_AGAIN,
        reason="state_expired",
    )


def ehr_signin_used() -> InvalidStateError:
    return refusal(
        InvalidStateError,
        Text(
            N_(
                "This EHR sign-in was already completed; its link works only once (reloading "
                "the page does not complete it again)."
            )
        ),
        _EHR_SIGNIN_AGAIN,
        reason="state_used",
    )


def ehr_signin_refused(code: str) -> PermissionDeniedError:
    """The EHR answered the approver's sign-in with ``error=code`` (already checked)."""
    return refusal(
        PermissionDeniedError,
        Text(N_("The EHR did not complete the sign-in (%(code)s)."), {"code": code}),
        Text(
            N_(
                "Sign in with an EHR account that may use this application, then try again "
                "from the configuration portal."
            )
        ),
        reason="ehr_signin_refused",
    )
