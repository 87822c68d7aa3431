"""Move messages from a poison queue back to their queue, for an operator to replay them.

When the EHR stays down longer than the write-back retries last, presence events end in
``presence-events-poison`` (the Functions host's convention ``<queue>-poison``). Once the cause is
fixed::

    python -m devtools.replay_poison --queue presence-events --dry-run   # count and show ids
    python -m devtools.replay_poison --queue presence-events             # move them back

Storage: ``--connection-string`` (or the ``CONNECTOR_STORAGE`` setting), or ``--account-url
https://<account>.queue.core.windows.net`` with your Azure sign-in (DefaultAzureCredential; the
identity needs "Storage Queue Data Contributor"). Message bodies are moved unchanged except that
a JSON body's ``attempt`` counter is reset to 0 (``--keep-attempts`` to keep it), so a replayed
write-back gets its full retry schedule again. Replaying is safe: processing is idempotent
(a write-back already done is not repeated). Bodies are never printed (only ids and counts).
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


def _reset_attempt(content: str) -> str:
    """The same message with ``attempt`` = 0 when it is base64/plain JSON carrying one."""
    try:
        raw = base64.b64decode(content, validate=True)
        encoded = True
    except (binascii.Error, ValueError):
        raw, encoded = content.encode(), False
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return content
    if not isinstance(body, dict) or not isinstance(body.get("attempt"), int):
        return content
    body["attempt"] = 0
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
        return ReplayResult(len(ids), ids)
    while max_messages is None or len(moved) < max_messages:
        want = 32 if max_messages is None else min(32, max_messages - len(moved))
        try:
            batch = list(source.receive_messages(max_messages=want, visibility_timeout=60))
        except ResourceNotFoundError:
            break
        if not batch:
            break
        for message in batch:
            content = str(message.content)
            if reset_attempts:
                content = _reset_attempt(content)
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
    for message_id in result.message_ids:
        print(f"  {message_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
