"""Structured logging with a correlation id per request. Log keys, never people.

``log_event(logger, "config.created", config_id=..., tenant_id=...)`` writes one line
``config.created config_id=... tenant_id=... correlation_id=...``; values are identifiers the
connector generated (config ids, visit keys, hashed keys), never names or EHR identifiers.

``install_redaction()`` (the composition root calls it) is the safety net under that rule: every
log record of the process, the connector's and any library's, has the values of OAuth query
parameters (``code``, ``state``, ``launch``, ``iss``, tokens) in URLs, ``Bearer`` credentials
and JWTs replaced by ``[redacted]`` before any handler (the Functions worker, Application
Insights) sees it. The Functions host's own request telemetry is kept free of query strings by
host.json (``enableHttpTriggerExtendedInfoCollection: false``; docs/operations.md).
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "REDACTED",
    "correlation_id",
    "get_logger",
    "install_redaction",
    "log_event",
    "new_correlation_id",
    "redact",
    "use_correlation_id",
]

REDACTED = "[redacted]"
_EVENT_FORMAT = "%s %s correlation_id=%s"  # log_event's records (see redact)
# Query (or form) parameters of launches, sign-in callbacks and token requests whose values
# must never reach a log: authorization codes, OAuth state, SMART launch ids, issuers (RFC 9207
# iss on callbacks), tokens, PKCE verifiers, client credentials.
SENSITIVE_PARAMETERS = (
    "code",
    "state",
    "launch",
    "iss",
    "session_state",
    "id_token",
    "access_token",
    "refresh_token",
    "client_assertion",
    "client_secret",
    "code_verifier",
    "assertion",
    "token",
    "validationToken",
)
_NAMES = "|".join(SENSITIVE_PARAMETERS)
_QUERY_VALUE = re.compile(r"(?i)(?<![A-Za-z0-9_])((?:" + _NAMES + r")=)[^&#\s'\"<>,;]+")
# In ``log_event`` lines only inside URLs (after ``?``, ``&`` or ``#``): the line's own
# ``key=value`` fields (a storage error ``code=``, say) are identifiers the connector chose.
_URL_QUERY_VALUE = re.compile(r"(?i)((?<=[?&#])(?:" + _NAMES + r")=)[^&#\s'\"<>,;]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")

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
    logger.log(level, _EVENT_FORMAT, event, fields, correlation_id())


def redact(text: str, *, structured: bool = False) -> str:
    """``text`` with OAuth parameter values, bearer credentials and JWTs replaced
    (``structured``: a ``log_event`` line, whose own fields are kept)."""
    if "=" in text:
        pattern = _URL_QUERY_VALUE if structured else _QUERY_VALUE
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "earer" in text:
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return text


_install_lock = threading.Lock()
_installed = False


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record is the handler's business, not ours
        return
    cleaned = redact(message, structured=record.msg == _EVENT_FORMAT)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        # Formatters use exc_text when it is set: exception messages may quote URLs.
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = redact(text)


def install_redaction() -> None:
    """Scrub every log record of the process as it is made (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        make_record = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
