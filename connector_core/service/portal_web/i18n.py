"""Languages: English, Brazilian Portuguese and Spanish, from Babel message catalogs.

The catalogs are the ``.po`` files in ``locales/<locale>/LC_MESSAGES/messages.po`` (extracted with
``make messages``, translated by people); they are compiled in memory on first use, so the
repository holds no binary ``.mo``. Every user-facing string is a msgid in a template
(``{{ _("...") }}``) or marked in Python with :func:`N_`; ``tests/portal/test_translations.py``
fails when a msgid has no translation in a catalog.

The language comes from ``?lang=`` (the switch on every page, remembered in the
``__Host-vv-lang`` cookie), else that cookie, else ``Accept-Language``; English by default.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from babel.support import NullTranslations

__all__ = [
    "DEFAULT_LOCALE",
    "LANG_COOKIE",
    "LOCALES",
    "LOCALE_NAMES",
    "N_",
    "catalog_path",
    "format_datetime",
    "language_cookie",
    "negotiate",
    "translations",
]

LOCALES = ("en", "pt-BR", "es")
DEFAULT_LOCALE = "en"
# Each language named in itself, for the switch.
LOCALE_NAMES = {"en": "English", "pt-BR": "Português (Brasil)", "es": "Español"}
LANG_COOKIE = "__Host-vv-lang"
LOCALE_DIR = Path(__file__).parent / "locales"
_BY_LOWER = {tag.lower(): tag for tag in LOCALES}
_BY_LANGUAGE = {"en": "en", "pt": "pt-BR", "es": "es"}
_cache: dict[str, NullTranslations] = {}
_lock = threading.Lock()


def N_(message: str) -> str:
    """Marks a msgid in Python for extraction; translated where it is shown."""
    return message


def _match(tag: str) -> str | None:
    tag = tag.strip().replace("_", "-").lower()
    if not tag or tag == "*":
        return None
    if tag in _BY_LOWER:
        return _BY_LOWER[tag]
    return _BY_LANGUAGE.get(tag.split("-", 1)[0])


def _accept_language(header: str) -> list[str]:
    """RFC 9110 ``Accept-Language`` ranges, most preferred first (q=0 left out)."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(header.split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag.strip() and quality > 0:
            ranked.append((-quality, index, tag.strip()))
    return [tag for _, _, tag in sorted(ranked)]


def negotiate(
    *, accept_language: str = "", cookie: str | None = None, requested: str | None = None
) -> str:
    """The page's language: ``?lang=``, else the cookie, else ``Accept-Language``."""
    for choice in (requested, cookie):
        if choice:
            found = _match(choice)
            if found:
                return found
    for tag in _accept_language(accept_language):
        found = _match(tag)
        if found:
            return found
    return DEFAULT_LOCALE


def language_cookie(locale: str) -> str:
    """``Set-Cookie`` remembering the switch (a preference, not a secret: readable by pages)."""
    return f"{LANG_COOKIE}={locale}; Max-Age=31536000; Path=/; Secure; SameSite=Lax"


def catalog_path(locale: str) -> Path:
    return LOCALE_DIR / locale.replace("-", "_") / "LC_MESSAGES" / "messages.po"


def translations(locale: str) -> NullTranslations:
    """The compiled catalog of ``locale`` (English: the msgids themselves)."""
    found = _cache.get(locale)
    if found is not None:
        return found
    with _lock:
        found = _cache.get(locale)
        if found is None:
            found = _load(locale)
            _cache[locale] = found
    return found


def _load(locale: str) -> NullTranslations:
    import io

    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po
    from babel.support import NullTranslations, Translations

    if locale == DEFAULT_LOCALE:
        return NullTranslations()
    with catalog_path(locale).open("rb") as handle:
        catalog = read_po(handle, locale=locale.replace("-", "_"))
    compiled = io.BytesIO()
    write_mo(compiled, catalog)  # fuzzy entries are left out, as pybabel compile does
    compiled.seek(0)
    return Translations(fp=compiled)


def format_datetime(value: datetime | None, locale: str) -> str:
    """A date and time in the page's language, in UTC (said so)."""
    if value is None:
        return ""
    from babel.dates import format_datetime as babel_format

    text: str = babel_format(
        value.astimezone(UTC), format="medium", tzinfo=UTC, locale=locale.replace("-", "_")
    )
    return f"{text} UTC"


def gettext(locale: str, message: str, **values: Any) -> str:
    """``message`` translated, with ``%(name)s`` placeholders filled in."""
    text = translations(locale).gettext(message)
    return text % values if values else text
