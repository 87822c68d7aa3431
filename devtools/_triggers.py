"""Queue and timer trigger listeners for the local Functions host.

They reproduce the behaviour of the Functions host's storage-queue and timer extensions:

* ``QueuePoller``: batch receive with a lease (visibility timeout), concurrent processing up to
  ``batchSize`` (a new batch is fetched when no more than ``newBatchThreshold`` messages are still
  running), host-style message decoding (``messageEncoding`` base64 or none), delete on success,
  on failure release the message with ``visibilityTimeout`` and, once its dequeue count has
  reached ``maxDequeueCount``, move it to ``<queue>-poison``. Idle polling backs off
  exponentially from 50 ms up to ``maxPollingInterval``.
* ``TimerRunner``: NCRONTAB / TimeSpan schedules in UTC, ``runOnStartup``, no overlapping runs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient, QueueServiceClient

from devtools._ncrontab import CronSchedule, IntervalSchedule

__all__ = ["QueueOptions", "QueuePoller", "TimerRunner", "decode_message", "utcnow"]

log = logging.getLogger("devtools.host")

# How long a received message stays invisible while the function runs (the host uses the
# function timeout, up to 10 minutes, and renews it; a local run does not need renewal).
_LEASE_SECONDS = 600
_MIN_POLL = 0.05


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class QueueOptions:
    """``extensions.queues`` of host.json, with the host's defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    max_polling_interval: float = 2.0
    message_encoding: str = "base64"


class MessageDecodingError(ValueError):
    pass


def decode_message(content: str, encoding: str) -> bytes:
    """The message body as the host hands it to the function."""
    if encoding.lower() == "none":
        return content.encode("utf-8")
    try:
        return base64.b64decode(content.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MessageDecodingError(
            "Message decoding has failed! Check MessageEncoding settings. "
            "(the message is not valid base64)"
        ) from exc


def ensure_queue(client: QueueClient) -> None:
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()


class QueuePoller:
    """Polls one queue for one queue-triggered function."""

    def __init__(
        self,
        *,
        function_name: str,
        queue_name: str,
        service: QueueServiceClient,
        options: QueueOptions,
        invoke: Callable[[func.QueueMessage], None],
    ) -> None:
        self.function_name = function_name
        self.queue_name = queue_name
        self.options = options
        self._service = service
        self._invoke = invoke
        self._client = service.get_queue_client(queue_name)
        self._stop = threading.Event()
        self._inflight = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name=f"queue-{function_name}", daemon=True
        )
        workers = max(1, options.batch_size + options.new_batch_threshold)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"q-{function_name}")

    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        self.signal_stop()
        self._thread.join(timeout)

    # -- polling ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._poll_loop()
        except Exception:  # never let a listener die silently
            log.exception("queue listener for %s stopped", self.function_name)
        finally:
            self._executor.shutdown(wait=True)

    def _poll_loop(self) -> None:
        delay = _MIN_POLL
        max_delay = max(_MIN_POLL, self.options.max_polling_interval)
        created = False
        failing_since: float | None = None
        while not self._stop.is_set():
            with self._cond:
                while self._inflight > self.options.new_batch_threshold and not self._stop.is_set():
                    self._cond.wait(0.5)
            if self._stop.is_set():
                break
            try:
                if not created:
                    ensure_queue(self._client)
                    created = True
                wanted = max(1, min(32, self.options.batch_size))
                messages = list(
                    self._client.receive_messages(
                        messages_per_page=wanted,
                        max_messages=wanted,
                        visibility_timeout=_LEASE_SECONDS,
                    )
                )
                failing_since = None
            except ResourceNotFoundError:
                created = False
                messages = []
            except Exception as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "queue %s (function %s) unreachable: %s",
                        self.queue_name,
                        self.function_name,
                        exc,
                    )
                messages = []
                delay = max_delay
            if messages:
                delay = _MIN_POLL
                for message in messages:
                    with self._cond:
                        self._inflight += 1
                    self._executor.submit(self._process, message)
                continue
            self._stop.wait(delay)
            delay = min(delay * 2, max_delay)

    # -- one message --------------------------------------------------------------------------

    def _process(self, message: Any) -> None:
        try:
            self._handle(message)
        except Exception:
            log.exception("queue %s: error handling message %s", self.queue_name, message.id)
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _handle(self, message: Any) -> None:
        dequeue_count = int(message.dequeue_count or 1)
        if dequeue_count > self.options.max_dequeue_count:
            # Already past the limit (for example after a crash): straight to poison.
            self._to_poison(message)
            return
        try:
            body = decode_message(str(message.content or ""), self.options.message_encoding)
            queue_message = QueueMessage(  # type: ignore[no-untyped-call]
                id=message.id,
                body=body,
                dequeue_count=dequeue_count,
                expiration_time=message.expires_on,
                insertion_time=message.inserted_on,
                time_next_visible=message.next_visible_on,
                pop_receipt=message.pop_receipt,
            )
            self._invoke(queue_message)
        except Exception as exc:
            if isinstance(exc, MessageDecodingError):
                log.error("queue %s message %s: %s", self.queue_name, message.id, exc)
            # (the invoker already logged the function's traceback)
            if dequeue_count >= self.options.max_dequeue_count:
                self._to_poison(message)
            else:
                self._client.update_message(
                    message,
                    pop_receipt=message.pop_receipt,
                    visibility_timeout=int(self.options.visibility_timeout),
                )
            return
        self._client.delete_message(message, pop_receipt=message.pop_receipt)

    def _to_poison(self, message: Any) -> None:
        poison_name = f"{self.queue_name}-poison"
        poison = self._service.get_queue_client(poison_name)
        ensure_queue(poison)
        poison.send_message(message.content)
        self._client.delete_message(message, pop_receipt=message.pop_receipt)
        log.warning(
            "Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
            self.options.max_dequeue_count,
            poison_name,
        )


class TimerRunner:
    """Fires one timer-triggered function on its schedule (UTC)."""

    def __init__(
        self,
        *,
        function_name: str,
        schedule: CronSchedule | IntervalSchedule,
        run_on_startup: bool,
        invoke: Callable[[func.TimerRequest], None],
    ) -> None:
        self.function_name = function_name
        self.schedule = schedule
        self.run_on_startup = run_on_startup
        self._invoke = invoke
        self._stop = threading.Event()
        self._last: dt.datetime | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"timer-{function_name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.signal_stop()
        self._thread.join(timeout)

    def _fire(self, *, past_due: bool, next_due: dt.datetime) -> None:
        now = utcnow()
        status = {
            "Last": (self._last or now).isoformat(),
            "Next": next_due.isoformat(),
            "LastUpdated": now.isoformat(),
        }
        request = TimerRequest(
            past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True}
        )
        self._last = now
        # The invoker logs failures; a failing run does not stop the schedule.
        with contextlib.suppress(Exception):
            self._invoke(request)

    def _run(self) -> None:
        try:
            if self.run_on_startup and not self._stop.is_set():
                self._fire(past_due=False, next_due=self.schedule.next_after(utcnow()))
            due = self.schedule.next_after(utcnow())
            while not self._stop.is_set():
                remaining = (due - utcnow()).total_seconds()
                if remaining > 0:
                    self._stop.wait(min(remaining, 1.0))
                    continue
                late = (utcnow() - due).total_seconds()
                following = self.schedule.next_after(due)
                self._fire(past_due=late > 1.0, next_due=following)
                due = self.schedule.next_after(max(due, utcnow()))
        except Exception:
            log.exception("timer for %s stopped", self.function_name)
