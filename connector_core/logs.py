"""Structured logging with a correlation id per request. Log keys, never people.

``log_event(logger, "config.created", config_id=..., tenant_id=...)`` writes one line
``config.created config_id=... tenant_id=... correlation_id=...``; values are identifiers the
connector generated (config ids, visit keys, hashed keys), never names or EHR identifiers.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["correlation_id", "get_logger", "log_event", "new_correlation_id", "use_correlation_id"]

_correlation: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def correlation_id() -> str:
    return _correlation.get()


@contextmanager
def use_correlation_id(value: str) -> Iterator[str]:
    token = _correlation.set(value)
    try:
        yield value
    finally:
        _correlation.reset(token)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"connector.{name}")


def _clean(value: object) -> str:
    text = str(value)
    # One log line per event: no line breaks smuggled in through values.
    return text.replace("\n", "\\n").replace("\r", "\\r").replace(" ", "_")[:200]


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **keys: object
) -> None:
    fields = " ".join(f"{k}={_clean(v)}" for k, v in keys.items())
    logger.log(level, "%s %s correlation_id=%s", event, fields, correlation_id())
