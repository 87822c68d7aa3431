"""The clinician's visit page and the patient's device check, in the page's language.

Both are self-contained (inline style, one nonce'd inline script, no external resource) because
EHRs show them in embedded browsers; the functions set a CSP that allows exactly that script.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from connector_core.service.portal_web import i18n
from connector_core.service.portal_web.i18n import N_
from connector_core.service.portal_web.public import _markup
from connector_core.service.portal_web.render import render

__all__ = ["ROLE_LABELS", "STATUS_LABELS", "device_test_html", "visit_page_html"]

ROLE_LABELS = {
    "clinician": N_("Clinician (you)"),
    "patient": N_("Patient"),
    "staff": N_("Staff"),
}
STATUS_LABELS = {
    "lobby": N_("Waiting in the lobby"),
    "connected": N_("Connected"),
    "left": N_("Left"),
}


def _since(person: dict[str, Any]) -> str | None:
    """When the participant's current state began (ISO), for the page to show."""
    status = person.get("status")
    if status == "left":
        return person.get("leftAt")
    if status == "lobby":
        return person.get("lobbySince")
    return person.get("joinedAt")


def _clock(value: str | None) -> str:
    return datetime.fromisoformat(value).strftime("%H:%M UTC") if value else ""


def page_people(view: dict[str, Any]) -> list[dict[str, str]]:
    """The rows as the page shows them (also what its script receives)."""
    return [
        {
            "role": str(p["role"]),
            "status": str(p["status"]),
            "since": _since(p) or "",
        }
        for p in view["participants"]
    ]


def _labels(locale: str) -> dict[str, Any]:
    """What the page's script writes, already translated (``{count}`` filled in by script)."""

    def t(message: str, **values: Any) -> str:
        return i18n.gettext(locale, message, **values)

    return {
        "roles": {k: t(v) for k, v in ROLE_LABELS.items()},
        "statuses": {k: t(v) for k, v in STATUS_LABELS.items()},
        "nobody": t(_NOBODY),
        "waiting": t(_WAITING),
        "connected": t(_CONNECTED, count="{count}"),
        "rememberedApp": t(_REMEMBERED_APP),
        "rememberedBrowser": t(_REMEMBERED_BROWSER),
        "offline": t(_OFFLINE),
    }


_NOBODY = N_("Nobody has joined yet.")
_WAITING = N_("The patient is waiting in the lobby: admit them in Teams.")
_CONNECTED = N_("%(count)s connected now.")
_REMEMBERED_APP = N_("This page opens the meeting in the Teams app, as you chose last time.")
_REMEMBERED_BROWSER = N_("This page opens the meeting in the browser, as you chose last time.")
_OFFLINE = N_("Updates paused: the connection to the connector was lost. Reload the page.")


def _summary(locale: str, view: dict[str, Any]) -> str:
    if view["patientWaitingInLobby"]:
        return i18n.gettext(locale, _WAITING)
    if view["connected"]:
        return i18n.gettext(locale, _CONNECTED, count=len(view["connected"]))
    return i18n.gettext(locale, _NOBODY)


def visit_page_html(
    *,
    locale: str,
    view: dict[str, Any],
    version: str,
    app_link: str,
    web_link: str,
    events_url: str,
    poll_url: str,
    script: str,
    correlation_id: str,
    page_url: str,
) -> str:
    people = page_people(view)
    return render(
        "visit_page.html",
        locale,
        title=N_("Virtual visit"),
        view=view,
        version=version,
        people=people,
        clock=_clock,
        role_labels=ROLE_LABELS,
        status_labels=STATUS_LABELS,
        summary=_summary(locale, view),
        labels=json.dumps(_labels(locale)),
        app_link=app_link,
        web_link=web_link,
        events_url=events_url,
        poll_url=poll_url,
        script=_markup(script),
        correlation_id=correlation_id,
        switch=[(code, f"{page_url}?{urlencode({'lang': code})}") for code in i18n.LOCALES],
        locale_names=i18n.LOCALE_NAMES,
    )


def device_test_html(*, locale: str, script: str, correlation_id: str, page_url: str) -> str:
    def t(message: str) -> str:
        return i18n.gettext(locale, message)

    results = {
        "cameraOk": t(N_("Camera: working. You can see yourself above.")),
        "micOk": t(N_("Microphone: working. The bar moves when you speak.")),
        "micSilent": t(
            N_("Microphone: no sound yet. Speak, or check that the right microphone is chosen.")
        ),
        "blocked": t(
            N_(
                "Camera and microphone are blocked. Allow them for this site (the camera icon "
                "in the address bar, or your browser's site settings), then select Start the "
                "check again."
            )
        ),
        "missing": t(
            N_(
                "No camera or microphone was found. Connect one, close other apps that may be "
                "using it, then select Start the check again."
            )
        ),
        "failed": t(
            N_(
                "The check could not start in this browser. Try an up-to-date Chrome, Edge, "
                "Firefox or Safari."
            )
        ),
        "speakerOk": t(N_("Speaker: working.")),
        "speakerNo": t(
            N_("Speaker: not heard. Turn the volume up or choose another speaker, then try again.")
        ),
        "playing": t(N_("Playing a tone for two seconds...")),
    }
    return render(
        "device_test.html",
        locale,
        title=N_("Check your camera, microphone and speaker"),
        results=json.dumps(results),
        script=_markup(script),
        correlation_id=correlation_id,
        switch=[(code, f"{page_url}?{urlencode({'lang': code})}") for code in i18n.LOCALES],
        locale_names=i18n.LOCALE_NAMES,
    )
