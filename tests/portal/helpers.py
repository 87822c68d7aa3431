"""A person using the configuration portal over real HTTP: a browser-like client (cookies,
redirects) that signs in as one of the sandbox's portal personas and submits the pages' forms
as a browser would (hidden fields included)."""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import urljoin

import httpx

from tests.stack import Browser, Stack

__all__ = ["PortalUser", "form_fields", "persona_upn"]

_FORM_RE = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_ATTR_RE = re.compile(r'([\w:-]+)(?:="([^"]*)")?')
_INPUT_RE = re.compile(r"<(input|button|select|textarea)\b([^>]*)>", re.I)


def _attrs(text: str) -> dict[str, str]:
    return {k.lower(): html.unescape(v or "") for k, v in _ATTR_RE.findall(text)}


def form_fields(page: str, action_suffix: str) -> tuple[str, dict[str, str]]:
    """``(action, hidden and checked fields)`` of the page's form whose action ends so."""
    for attributes, body in _FORM_RE.findall(page):
        attrs = _attrs(attributes)
        if attrs.get("action", "").endswith(action_suffix):
            fields: dict[str, str] = {}
            for tag, inner in _INPUT_RE.findall(body):
                a = _attrs(inner)
                name = a.get("name")
                if not name or tag.lower() != "input":
                    continue
                kind = a.get("type", "text")
                if kind in ("radio", "checkbox") and "checked" not in a:
                    continue
                fields.setdefault(name, a.get("value", ""))
            return attrs["action"], fields
    raise LookupError(f"no form posting to ...{action_suffix}")


def persona_upn(stack: Stack, persona: str) -> str:
    return stack.sandbox.entra.persona(persona).upn


class PortalUser:
    """One browser with its own cookies, signed in (or not) to the portal."""

    def __init__(self, stack: Stack, *, language: str | None = None) -> None:
        self.stack = stack
        self.browser: Browser = stack.browser()
        if language:
            self.browser.client.headers["Accept-Language"] = language

    @property
    def client(self) -> httpx.Client:
        return self.browser.client

    def url(self, path: str = "") -> str:
        return f"{self.stack.portal}{path}"

    def get(self, path: str = "", **kwargs: Any) -> httpx.Response:
        return self.client.get(self.url(path), **kwargs)

    def sign_in(self, persona: str | None = None, *, upn: str | None = None) -> httpx.Response:
        """Sign in through the Entra stand-in's account picker; returns the landing page."""
        upn = upn or persona_upn(self.stack, persona or "admin")
        picker = self.client.get(self.url("/signin"))
        assert picker.status_code == 200, picker.text[:500]
        match = re.search(
            r'<a class="account[^"]*" data-upn="' + re.escape(upn) + r'"[^>]*href="([^"]+)"',
            picker.text,
        )
        assert match, f"{upn} is not on the account picker"
        landing = self.client.get(html.unescape(match.group(1)))
        assert landing.status_code == 200, landing.text[:800]
        return landing

    def post_form(self, page: httpx.Response, action_suffix: str, **values: str) -> httpx.Response:
        """Submit a form of ``page`` as a browser does (its hidden fields, plus ``values``)."""
        action, fields = form_fields(page.text, action_suffix)
        fields.update(values)
        return self.client.post(
            urljoin(str(page.url), action),
            data=fields,
            headers={"Origin": self.stack.url, "Sec-Fetch-Site": "same-origin"},
        )

    def close(self) -> None:
        self.browser.close()
