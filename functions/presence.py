"""Presence: the Graph webhook (notifications, lifecycle), the queue worker, the renewal timer.

``POST /api/presence`` and ``POST /api/presence/lifecycle``:
* ``?validationToken=...``: the subscription handshake, answered ``200 text/plain`` with the
  decoded token (the host decodes the query: ``%2B`` is ``+``, ``%20`` a space);
* otherwise ``{"value": [...]}``: verified, decrypted and enqueued, then ``202``. No EHR or Graph
  call is made here: Graph wants an answer within 3 seconds.

``presence_worker`` (queue ``presence-events``) writes participant state and the EHR write-back;
``subscription_worker`` (queue ``meeting-subscriptions``) creates a new meeting's call-event
subscription after the launch has answered; ``presence_renewal`` (every 5 minutes) keeps live
visits' subscriptions from expiring.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from connector_core.errors import InvalidInputError, PayloadTooLargeError
from connector_core.logs import get_logger, log_event, new_correlation_id, use_correlation_id
from connector_core.queues import PRESENCE_QUEUE, SUBSCRIPTION_QUEUE
from functions._http import api, container

bp = func.Blueprint()
_log = get_logger("presence")

# Graph batches up to a few hundred notifications; each encrypted item is a few KiB.
MAX_NOTIFICATION_BODY = 4 * 1024 * 1024
MAX_VALIDATION_TOKEN = 2048
# host.json extensions.queues.maxDequeueCount (tests/unit/test_presence_functions.py checks they
# agree): on its last try the worker moves a failing message to the poison queue itself, with
# the reason, instead of letting the host move it there without one.
HOST_MAX_DEQUEUE_COUNT = 5


def _handshake(token: str) -> func.HttpResponse:
    if len(token) > MAX_VALIDATION_TOKEN:
        raise InvalidInputError("The validation token is too long.")
    return func.HttpResponse(
        token,
        status_code=200,
        mimetype="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


def _notifications(req: func.HttpRequest) -> func.HttpResponse:
    token = req.params.get("validationToken")
    if token is not None:
        return _handshake(token)
    raw = req.get_body() or b""
    if len(raw) > MAX_NOTIFICATION_BODY:
        raise PayloadTooLargeError("The notification body is too large.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: not a 500
        raise InvalidInputError("The notification body must be JSON.") from None
    from connector_core.service.presence import accept_notifications

    result = accept_notifications(container(), body)
    return func.HttpResponse(
        status_code=202,
        headers={"x-enqueued": str(result.enqueued), "x-dropped": str(result.dropped)},
    )


@bp.route(route="presence", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@api
def presence_webhook(req: func.HttpRequest) -> func.HttpResponse:
    return _notifications(req)


@bp.route(route="presence/lifecycle", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@api
def presence_lifecycle(req: func.HttpRequest) -> func.HttpResponse:
    return _notifications(req)


@bp.queue_trigger(arg_name="msg", queue_name=PRESENCE_QUEUE, connection="CONNECTOR_STORAGE")
def presence_worker(msg: func.QueueMessage) -> None:
    with use_correlation_id(new_correlation_id()):
        from connector_core.errors import ConnectorError
        from connector_core.service.presence import poison_body, process_message

        body = msg.get_body().decode("utf-8", errors="replace")
        dequeue_count = msg.dequeue_count or 1
        try:
            process_message(container(), body, dequeue_count=dequeue_count)
        except Exception as error:
            log_event(
                _log,
                "presence.message.failed",
                level=logging.ERROR,
                error=type(error).__name__,
                status=getattr(error, "extra", {}).get("status", "-"),
                error_code=getattr(error, "extra", {}).get("code", "-"),
                dequeue_count=dequeue_count,
            )
            if dequeue_count < HOST_MAX_DEQUEUE_COUNT:
                raise  # the host retries it (visibilityTimeout)
            # The host's last try: park it with the reason (if even that fails, the host moves
            # it to presence-events-poison as it came).
            poison_body(
                container(),
                body,
                reason="host_retries",
                detail=(
                    error.detail
                    if isinstance(error, ConnectorError)
                    else f"{type(error).__name__} on every try"
                ),
                error=error if isinstance(error, ConnectorError) else None,
            )


@bp.queue_trigger(arg_name="msg", queue_name=SUBSCRIPTION_QUEUE, connection="CONNECTOR_STORAGE")
def subscription_worker(msg: func.QueueMessage) -> None:
    with use_correlation_id(new_correlation_id()):
        # Retries with backoff and the poison queue are the service's own; an exception here
        # means even that failed, and the host redelivers the message.
        from connector_core.service.subscriptions import process_subscription_message

        process_subscription_message(container(), msg.get_body().decode("utf-8", errors="replace"))


@bp.timer_trigger(schedule="0 */5 * * * *", arg_name="timer", run_on_startup=False)
def presence_renewal(timer: func.TimerRequest) -> None:
    with use_correlation_id(new_correlation_id()):
        from connector_core.service.presence import renew_subscriptions

        renew_subscriptions(container())
