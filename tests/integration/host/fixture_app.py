"""A small function app for the local host's tests: HTTP, queue and timer triggers in Blueprints.

Every function records what it received in a module-level ``Recorder`` so tests can assert on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import azure.functions as func

STORAGE_SETTING = "HOSTTEST_STORAGE"
QUEUE_OK = "hosttest-ok"
QUEUE_FAIL = "hosttest-fail"


class Recorder:
    """A thread-safe list that tests can wait on."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def items(self) -> list[Any]:
        with self._cond:
            return list(self._items)

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 10.0) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._items), timeout):
                raise AssertionError(f"condition not met within {timeout}s; items: {self._items}")
            return list(self._items)


received = Recorder()  # on_ok
failures = Recorder()  # on_fail dequeue counts
ticks = Recorder()  # every_second
manual = Recorder()  # yearly


def _json(data: Any, status: int = 200) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(data), status_code=status, mimetype="application/json")


http_bp = func.Blueprint()


@http_bp.route(route="echo/{name}", methods=["GET", "POST", "PUT"])
def echo(req: func.HttpRequest) -> func.HttpResponse:
    return _json(
        {
            "method": req.method,
            "url": req.url,
            "params": dict(req.params),
            "route": dict(req.route_params),
            "headers": dict(req.headers),
            "body": req.get_body().decode("utf-8"),
        }
    )


@http_bp.route(route="items/{id:int}", methods=["GET"])
def item_by_id(req: func.HttpRequest) -> func.HttpResponse:
    return _json({"fn": "item_by_id", "route": dict(req.route_params)})


@http_bp.route(route="items/special", methods=["GET"])
def item_special(req: func.HttpRequest) -> func.HttpResponse:
    return _json({"fn": "item_special", "route": dict(req.route_params)})


@http_bp.route(route="opt/{name?}", methods=["GET"])
def optional(req: func.HttpRequest) -> func.HttpResponse:
    return _json({"route": dict(req.route_params)})


@http_bp.route(route="files/{*rest}", methods=["GET"])
def catch_all(req: func.HttpRequest) -> func.HttpResponse:
    return _json({"route": dict(req.route_params)})


@http_bp.route(route="typed/{word:alpha}/{id:guid}/{flag:bool}", methods=["GET"])
def typed(req: func.HttpRequest) -> func.HttpResponse:
    return _json({"route": dict(req.route_params)})


@http_bp.route(methods=["GET"])
def plain(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("hello")


@http_bp.route(route="post-only", methods=["POST"])
def post_only(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(status_code=201)


@http_bp.route(route="cookies", methods=["GET"])
def cookies(req: func.HttpRequest) -> func.HttpResponse:
    resp = func.HttpResponse("ok", headers={"X-One": "1"})
    resp.headers.add("Set-Cookie", "__Host-a=1; Path=/; Secure; HttpOnly; SameSite=Lax")
    resp.headers.add("Set-Cookie", "b=2; Path=/; Max-Age=60")
    return resp


@http_bp.route(route="boom", methods=["GET"])
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("secret detail that must not leak")


@http_bp.route(route="setting", methods=["GET"])
def setting(req: func.HttpRequest) -> func.HttpResponse:
    return _json({k: os.environ.get(k) for k in ("HOSTTEST_GREETING", "HOSTTEST_OVERRIDE")})


@http_bp.function_name("async_ctx")
@http_bp.route(route="async/ctx", methods=["GET"])
async def async_with_context(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    await asyncio.sleep(0)
    return _json({"invocation_id": context.invocation_id, "function_name": context.function_name})


@http_bp.route(route="enqueue", methods=["POST"])
@http_bp.queue_output(arg_name="out", queue_name=QUEUE_OK, connection=STORAGE_SETTING)
def enqueue(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    out.set(req.get_body().decode("utf-8"))
    return func.HttpResponse(status_code=202)


queue_bp = func.Blueprint()


@queue_bp.queue_trigger(arg_name="msg", queue_name=QUEUE_OK, connection=STORAGE_SETTING)
def on_ok(msg: func.QueueMessage) -> None:
    received.add(
        {
            "id": msg.id,
            "body": msg.get_body().decode("utf-8"),
            "dequeue_count": msg.dequeue_count,
            "insertion_time": msg.insertion_time,
            "pop_receipt": msg.pop_receipt,
        }
    )


@queue_bp.queue_trigger(arg_name="msg", queue_name=QUEUE_FAIL, connection=STORAGE_SETTING)
def on_fail(msg: func.QueueMessage) -> None:
    failures.add(msg.dequeue_count)
    raise ValueError("this message always fails")


timer_bp = func.Blueprint()


@timer_bp.timer_trigger(schedule="*/1 * * * * *", arg_name="timer")
def every_second(timer: func.TimerRequest) -> None:
    ticks.add({"past_due": timer.past_due})


@timer_bp.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer")
def yearly(timer: func.TimerRequest, context: func.Context) -> None:
    manual.add({"past_due": timer.past_due, "function_name": context.function_name})


app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(http_bp)
app.register_functions(queue_bp)
app.register_functions(timer_bp)
