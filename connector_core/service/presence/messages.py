"""What travels on the ``presence-events`` queue (and its poison queue): keys, times and roles.

* ``PresenceMessage``: one call or lifecycle event, as the webhook verified and reduced it.
* ``PresenceBatch``: several of them in one queue message (the webhook's group commit, and the
  worker's retries of a visit's events).
* ``PoisonNote``: why a message was moved to ``presence-events-poison``, carried in the message
  itself (``PresenceBatch.poisoned``; ``PoisonedBody`` wraps a body that could not be read), so
  an operator sees the reason beside the event and ``devtools.replay_poison`` can replay it.

Storage queue messages hold 64 KiB, 48 KiB of JSON once base64-encoded: ``pack`` keeps every
message under ``MAX_BATCH_BYTES``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from connector_core.domain.presence import CallEvent

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ITEMS",
    "PoisonNote",
    "PoisonedBody",
    "PresenceBatch",
    "PresenceMessage",
    "pack",
    "read_body",
]

# Storage queue messages hold 64 KiB (base64: 48 KiB of JSON); stay well inside.
MAX_BATCH_BYTES = 40 * 1024
MAX_BATCH_ITEMS = 100


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class PresenceMessage(_Frozen):
    """What the webhook puts on ``presence-events``: keys, times and roles only."""

    v: Literal[1] = 1
    # "summary": refresh the visit's report summary (connector_core.service.reports), sent by
    # the worker itself a few seconds after it commits a visit's events (no event, no ids).
    kind: Literal["call", "lifecycle", "summary"]
    id: str  # for logs and tracing (a fresh uuid per notification item)
    subscription_id: str
    visit_key: str
    event: CallEvent | None = None
    lifecycle_event: str | None = None
    attempt: int = 0  # EHR write-back attempts that failed so far
    # Write-backs of this event the EHR confirmed although the ledger could not record it (a
    # storage error after the call): the retry records them without calling the EHR again.
    confirmed: tuple[str, ...] = ()


class PoisonNote(_Frozen):
    """Why a message is in the poison queue (no names, no EHR ids: codes and our own keys)."""

    reason: str  # malformed, storage_rejected, ehr_rejected, retries_exhausted, host_retries
    detail: str
    status: int | None = None  # the HTTP status storage or the EHR answered, if any
    code: str | None = None  # the service's error code, if any
    correlation_id: str
    at: datetime


class PresenceBatch(_Frozen):
    """One queue message carrying several events (of concurrent webhook requests, or a visit's
    events sent back for a retry). ``poisoned`` says why it is in the poison queue."""

    v: Literal[1] = 1
    items: tuple[PresenceMessage, ...]
    poisoned: PoisonNote | None = None


class PoisonedBody(_Frozen):
    """A message body that could not be read, kept as it came with the reason."""

    v: Literal[1] = 1
    poisoned: PoisonNote
    raw: str


def read_body(body: str) -> list[PresenceMessage]:
    """The events of a ``presence-events`` message; ``ValueError`` when it is not one."""
    try:
        raw = json.loads(body)
        if isinstance(raw, dict) and "items" in raw:
            return list(PresenceBatch.model_validate(raw).items)
        if isinstance(raw, dict) and "raw" in raw:
            raise ValueError("a body that could not be read before")
        return [PresenceMessage.model_validate(raw)]
    except (ValidationError, TypeError) as error:
        raise ValueError(str(error)) from None


def pack(messages: Iterable[PresenceMessage], *, poisoned: PoisonNote | None = None) -> list[str]:
    """Queue message bodies for ``messages``: one bare message when alone, else batches of at
    most ``MAX_BATCH_ITEMS`` events and ``MAX_BATCH_BYTES`` bytes."""
    items = [m.model_dump_json() for m in messages]
    if not items:
        return []
    if len(items) == 1 and poisoned is None:
        return items
    note = "" if poisoned is None else f',"poisoned":{poisoned.model_dump_json()}'
    bodies: list[str] = []
    chunk: list[str] = []
    size = 0
    for item in items:
        if chunk and (size + len(item) > MAX_BATCH_BYTES or len(chunk) >= MAX_BATCH_ITEMS):
            bodies.append('{"v":1,"items":[' + ",".join(chunk) + "]" + note + "}")
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + 1
    bodies.append('{"v":1,"items":[' + ",".join(chunk) + "]" + note + "}")
    return bodies
