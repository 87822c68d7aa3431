"""Framework-neutral HTTP request and response for the portal's pages.

``functions/portal_web.py`` translates ``func.HttpRequest`` into :class:`WebRequest` and
:class:`WebResponse` back, so the pages are plain functions tested without the Functions SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

__all__ = ["WebRequest", "WebResponse", "parse_cookies", "parse_form", "redirect"]

MAX_FORM_BYTES = 64 * 1024
_NO_STORE = "no-store"


@dataclass(frozen=True)
class WebRequest:
    method: str
    path: str
    route: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass
class WebResponse:
    status: int = 200
    body: str | bytes = ""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=lambda: {"Cache-Control": _NO_STORE})
    set_cookies: list[str] = field(default_factory=list)


def redirect(location: str, *, status: int = 303) -> WebResponse:
    """A redirect to one of the portal's own paths (or a URL a use case vetted)."""
    if any(c in location for c in "\r\n"):
        raise ValueError("redirect target contains a line break")
    return WebResponse(status=status, headers={"Location": location, "Cache-Control": _NO_STORE})


def parse_cookies(header: str) -> dict[str, str]:
    """The request's cookies (the first of a name wins, as browsers send the most specific)."""
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in jar:
            jar[name] = value.strip().strip('"')
    return jar


def parse_form(body: bytes, content_type: str) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the first value of a name wins)."""
    if len(body) > MAX_FORM_BYTES:
        from connector_core.errors import PayloadTooLargeError

        raise PayloadTooLargeError(f"The form is larger than {MAX_FORM_BYTES} bytes.")
    if "application/x-www-form-urlencoded" not in content_type.lower():
        return {}
    form: dict[str, str] = {}
    text = body.decode("utf-8", errors="replace")
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=64)
    except ValueError:  # more fields than any portal form has
        from connector_core.errors import InvalidInputError

        raise InvalidInputError("The form has too many fields.") from None
    for name, value in pairs:
        form.setdefault(name, value)
    return form
