"""Move messages from a poison queue back to their queue, for an operator to replay them.

When the EHR stays down longer than the write-back retries last, presence events end in
``presence-events-poison`` (the Functions host's convention ``<queue>-poison``). Once the cause is
fixed::

    python -m devtools.replay_poison --queue presence-events --dry-run   # count and show ids
    python -m devtools.replay_poison --queue presence-events             # move them back

Storage: ``--connection-string`` (or the ``CONNECTOR_STORAGE`` setting), or ``--account-url
https://<account>.queue.core.windows.net`` with your Azure sign-in (DefaultAzureCredential; the
identity needs "Storage Queue Data Contributor"). The presence worker writes each poisoned
message with the reason (``"poisoned": {"reason", "detail", "status", "code",
"correlationId"...}``; a body it could not read is kept as ``"raw"``); ``--dry-run`` lists the
ids with their reasons. Replaying moves the events back without that note and with their
``attempt`` counters reset to 0 (``--keep-attempts`` keeps them), so a replayed write-back gets
its full retry schedule again; a kept ``raw`` body goes back as it first came. Replaying is
safe: processing is idempotent (a write-back already done is not repeated). Bodies are never
printed (only ids, reasons and counts).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["ReplayResult", "main", "replay_poison"]


@dataclass(frozen=True)
class ReplayResult:
    moved: int
    message_ids: tuple[str, ...]
    reasons: tuple[str, ...] = ()  # per message: "reason status code", or "-"


def _decode(content: str) -> tuple[Any, bool]:
    """The JSON of a queue message (base64 as the Functions host writes it, or plain) and
    whether it was base64; ``None`` when it is not JSON."""
    try:
        raw = base64.b64decode(content, validate=True)
        encoded = True
    except (binascii.Error, ValueError):
        raw, encoded = content.encode(), False
    try:
        return json.loads(raw), encoded
    except (ValueError, UnicodeDecodeError):
        return None, encoded


def _reason(content: str) -> str:
    body, _ = _decode(content)
    note = body.get("poisoned") if isinstance(body, dict) else None
    if not isinstance(note, dict):
        return "-"
    return " ".join(
        str(note.get(k) if note.get(k) is not None else "-") for k in ("reason", "status", "code")
    )


def _prepare(content: str, *, reset_attempts: bool) -> str:
    """The message to put back: without its poison note (a kept raw body as it first came),
    with ``attempt`` counters reset to 0 when asked."""
    body, encoded = _decode(content)
    if not isinstance(body, dict):
        return content
    if isinstance(body.get("raw"), str) and "poisoned" in body:
        text = str(body["raw"])
    else:
        changed = body.pop("poisoned", None) is not None
        items = body.get("items") if isinstance(body.get("items"), list) else [body]
        for item in items:
            if reset_attempts and isinstance(item, dict) and isinstance(item.get("attempt"), int):
                changed = changed or item["attempt"] != 0
                item["attempt"] = 0
        if not changed:
            return content
        text = json.dumps(body, separators=(",", ":"))
    return base64.b64encode(text.encode()).decode() if encoded else text


def _service(connection_string: str | None, account_url: str | None) -> Any:
    from azure.storage.queue import QueueServiceClient

    if account_url:
        from azure.identity import DefaultAzureCredential

        return QueueServiceClient(account_url=account_url, credential=DefaultAzureCredential())
    if not connection_string:
        raise SystemExit("give --connection-string, --account-url or set CONNECTOR_STORAGE")
    return QueueServiceClient.from_connection_string(connection_string)


def replay_poison(
    *,
    queue: str,
    connection_string: str | None = None,
    account_url: str | None = None,
    max_messages: int | None = None,
    dry_run: bool = False,
    reset_attempts: bool = True,
) -> ReplayResult:
    """Move up to ``max_messages`` from ``<queue>-poison`` back to ``queue``."""
    from azure.core.exceptions import ResourceNotFoundError

    service = _service(connection_string, account_url)
    source = service.get_queue_client(f"{queue}-poison")
    target = service.get_queue_client(queue)
    moved: list[str] = []
    if dry_run:
        try:
            peeked = source.peek_messages(max_messages=32)
        except ResourceNotFoundError:
            return ReplayResult(0, ())
        ids = tuple(m.id for m in peeked)
        return ReplayResult(len(ids), ids, tuple(_reason(str(m.content)) for m in peeked))
    while max_messages is None or len(moved) < max_messages:
        want = 32 if max_messages is None else min(32, max_messages - len(moved))
        try:
            batch = list(source.receive_messages(max_messages=want, visibility_timeout=60))
        except ResourceNotFoundError:
            break
        if not batch:
            break
        for message in batch:
            content = _prepare(str(message.content), reset_attempts=reset_attempts)
            target.send_message(content)  # first copy, then delete: never lost
            source.delete_message(message)
            moved.append(str(message.id))
    return ReplayResult(len(moved), tuple(moved))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.replay_poison",
        description="Move messages from <queue>-poison back to <queue>.",
    )
    parser.add_argument("--queue", required=True, help="the queue, e.g. presence-events")
    parser.add_argument("--connection-string", default=os.environ.get("CONNECTOR_STORAGE"))
    parser.add_argument("--account-url", help="https://<account>.queue.core.windows.net")
    parser.add_argument("--max", type=int, default=None, help="move at most this many")
    parser.add_argument("--dry-run", action="store_true", help="only count (peek)")
    parser.add_argument("--keep-attempts", action="store_true", help="keep retry counters")
    args = parser.parse_args(argv)
    result = replay_poison(
        queue=args.queue,
        connection_string=args.connection_string,
        account_url=args.account_url,
        max_messages=args.max,
        dry_run=args.dry_run,
        reset_attempts=not args.keep_attempts,
    )
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} {result.moved} message(s) from {args.queue}-poison to {args.queue}")
    reasons = result.reasons or ("",) * len(result.message_ids)
    for message_id, reason in zip(result.message_ids, reasons, strict=True):
        print(f"  {message_id}  {reason}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
