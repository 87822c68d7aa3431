"""Sentences people read, written in English and marked for translation.

A use case that refuses a browser request can say what happened and what to do next as
:class:`Text`: a msgid of the portal_web Babel catalogs (``N_``-marked, so ``make messages``
extracts it) with its ``%(name)s`` values. :func:`refusal` builds the error: its ``detail`` and
``action`` stay the English sentences (problem+json, logs of the caller, tests), and the error
keeps the texts, so the browser's error page shows them in the reader's language
(``portal_web.public.error_html``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from connector_core.errors import ConnectorError

__all__ = ["N_", "Text", "refusal"]

E = TypeVar("E", bound="ConnectorError")


def N_(message: str) -> str:
    """Marks a msgid for extraction (babel.cfg); translated where it is shown."""
    return message


@dataclass(frozen=True)
class Text:
    """One translatable sentence: ``msgid`` with ``%(name)s`` placeholders for ``values``
    (values that come from outside, such as an OAuth error code, are never translated)."""

    msgid: str
    values: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.msgid % dict(self.values) if self.values else self.msgid

    def translate(self, gettext: Callable[[str], str]) -> str:
        text = gettext(self.msgid)
        return text % dict(self.values) if self.values else text


def refusal(kind: type[E], message: Text, action: Text | None = None, **extra: Any) -> E:
    """``kind(detail, action=..., **extra)`` in English, carrying ``message`` and ``action``
    for the error page to translate."""
    if action is not None:
        extra["action"] = str(action)
    error = kind(str(message), **extra)
    error.texts = (message, action)
    return error
