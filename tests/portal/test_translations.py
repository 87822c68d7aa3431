"""Every message of the portal and of the patient's and clinician's pages is translated.

The msgids are extracted exactly as ``make messages`` does (Babel, ``babel.cfg``: the templates
and the ``N_``/``_`` marks in Python); each catalog must translate every one of them, not
fuzzy, with the same ``%(name)s`` placeholders and ``{name}`` slots (a translation that drops
one would fail at render time or lose a value). The checker itself is shown to fail on a
catalog with a translation missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from connector_core.service.portal_web import i18n
from connector_core.service.portal_web.render import TEMPLATE_DIR, render

REPO_ROOT = Path(__file__).resolve().parents[2]
PORTAL = REPO_ROOT / "connector_core" / "service" / "portal_web"
TRANSLATED = [locale for locale in i18n.LOCALES if locale != i18n.DEFAULT_LOCALE]
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|\{(\w+)\}|%%")


def _method_map() -> tuple[list[tuple[str, str]], dict[str, dict[str, str]]]:
    """babel.cfg as Babel's extract_from_dir wants it (patterns relative to the repository)."""
    methods: list[tuple[str, str]] = []
    options: dict[str, dict[str, str]] = {}
    section = None
    for line in (PORTAL / "babel.cfg").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            method, _, pattern = line.strip("[]").partition(":")
            section = pattern.strip()
            methods.append((section, method.strip()))
            options[section] = {}
        elif section is not None:
            key, _, value = line.partition("=")
            options[section][key.strip()] = value.strip()
    return methods, options


def extracted_msgids() -> set[str]:
    methods, options = _method_map()
    found = set()
    for _, _, message, _, _ in extract_from_dir(
        str(REPO_ROOT), method_map=methods, options_map=options, keywords={"_": None, "N_": None}
    ):
        found.add(message if isinstance(message, str) else message[0])
    return found


def _placeholders(text: str) -> list[str]:
    return sorted(a or b or "%%" for a, b in _PLACEHOLDER.findall(text))


def problems(catalog: Catalog, msgids: set[str]) -> list[str]:
    """What is wrong with ``catalog`` for these msgids (empty: nothing)."""
    found: list[str] = []
    for msgid in sorted(msgids):
        message = catalog.get(msgid)
        if message is None or not message.string:
            found.append(f"missing: {msgid!r}")
        elif message.fuzzy:
            found.append(f"fuzzy: {msgid!r}")
        elif _placeholders(msgid) != _placeholders(str(message.string)):
            found.append(f"placeholders differ: {msgid!r} -> {message.string!r}")
    return found


def _catalog(locale: str) -> Catalog:
    with i18n.catalog_path(locale).open("rb") as handle:
        return read_po(handle, locale=locale.replace("-", "_"))


def test_the_extraction_finds_the_pages_messages() -> None:
    msgids = extracted_msgids()
    assert len(msgids) > 150
    for sample in (
        "Sign in with Microsoft",  # a template
        "Your video visit will start soon",  # the patient's waiting page (Python, N_)
        "Configuration created. The approver can now sign in to approve.",  # a notice
        "This is a FHIR DSTU2 endpoint; the connector needs FHIR R4.",  # a URL check
        "Provider launch (FDI record for Hyperspace, Hyperdrive, Haiku and Canto)",  # records
    ):
        assert sample in msgids


@pytest.mark.parametrize("locale", TRANSLATED)
def test_every_message_is_translated(locale: str) -> None:
    assert problems(_catalog(locale), extracted_msgids()) == []


def test_the_template_catalog_is_up_to_date() -> None:
    """``make messages`` was run after the last change to a message."""
    with (PORTAL / "locales" / "messages.pot").open("rb") as handle:
        template = {m.id for m in read_po(handle) if m.id}
    assert template == extracted_msgids()


def test_a_missing_translation_fails_the_check() -> None:
    catalog = _catalog("es")
    msgids = extracted_msgids()
    victim = "Sign in with Microsoft"
    broken = Catalog(locale="es")
    for message in catalog:
        if message.id and message.id != victim:
            broken.add(message.id, message.string, flags=message.flags)
    assert problems(broken, msgids) == [f"missing: {victim!r}"]
    broken.get("Approve").flags.add("fuzzy")  # type: ignore[union-attr]
    assert "fuzzy: 'Approve'" in problems(broken, msgids)
    broken.get("Region: %(region)s").string = "Región"  # type: ignore[union-attr]
    assert any(p.startswith("placeholders differ") for p in problems(broken, msgids))


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_every_template_renders_in_every_language(locale: str) -> None:
    """Rendering fails on a translation whose placeholders do not fit (newstyle gettext)."""
    from connector_core.service.portal_web import public

    page = public.waiting_html(
        locale=locale, chosen=True, refresh_seconds=5, script="", correlation_id="c" * 32
    )
    assert f'<html lang="{locale}"' in page and f"url=/api/launch/wait?lang={locale}" in page
    names = sorted(p.name for p in TEMPLATE_DIR.glob("*.html"))
    assert "config.html" in names and "public_error.html" in names
    title = render(
        "public_done.html",
        locale,
        title="EHR sign-in complete",
        script="",
        correlation_id="c",
        switch=(),
    )
    assert i18n.translations(locale).gettext("EHR sign-in complete") in title
