"""Templates: Jinja2 with autoescaping, one environment per language (gettext installed).

Static files (``static/``) are served by the Function App itself at ``/api/portal/static/...``
with a content hash in the URL, so they can be cached for a year and never go stale.
"""

from __future__ import annotations

import hashlib
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector_core.service.portal_web import i18n

if TYPE_CHECKING:
    from jinja2 import Environment

__all__ = ["STATIC_DIR", "STATIC_TYPES", "TEMPLATE_DIR", "render", "static_file", "static_url"]

PORTAL_PATH = "/api/portal"
TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_environments: dict[str, Environment] = {}
_lock = threading.Lock()


@cache
def static_file(name: str) -> tuple[bytes, str, str] | None:
    """``(content, content type, short hash)`` of a file in ``static/``; None if unknown.
    Only plain names of known types: nothing outside the folder can be asked for."""
    path = STATIC_DIR / name
    suffix = path.suffix.lower()
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        return None
    if not path.is_file():
        return None
    content = path.read_bytes()
    return content, STATIC_TYPES[suffix], hashlib.sha256(content).hexdigest()[:12]


def static_url(name: str) -> str:
    found = static_file(name)
    version = found[2] if found else "missing"
    return f"{PORTAL_PATH}/static/{name}?v={version}"


def _environment(locale: str) -> Environment:
    env = _environments.get(locale)
    if env is not None:
        return env
    with _lock:
        env = _environments.get(locale)
        if env is None:
            from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

            env = Environment(
                loader=FileSystemLoader(TEMPLATE_DIR),
                autoescape=select_autoescape(["html"], default=True),
                undefined=StrictUndefined,
                extensions=["jinja2.ext.i18n"],
                trim_blocks=True,
                lstrip_blocks=True,
            )
            env.install_gettext_translations(  # type: ignore[attr-defined]
                i18n.translations(locale), newstyle=True
            )
            env.globals.update(
                static=static_url,
                portal=PORTAL_PATH,
                locales=i18n.LOCALES,
                locale_names=i18n.LOCALE_NAMES,
                format_dt=lambda value: i18n.format_datetime(value, locale),
            )
            _environments[locale] = env
    return env


def render(template: str, locale: str, **context: Any) -> str:
    """The page ``template`` in ``locale``; ``context`` values are escaped by Jinja2."""
    return _environment(locale).get_template(template).render(lang=locale, **context)
