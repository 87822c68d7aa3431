"""A local Azure Functions host for the functions registered on a ``func.FunctionApp``.

Stands in for Azure Functions Core Tools (``func start``) where it cannot be installed. It reads
the same metadata the real host indexes (``app.get_functions()`` and each function's bindings)
and serves:

* HTTP triggers at ``http://127.0.0.1:{port}/{routePrefix}/{route}`` with ASP.NET Core route
  templates, method filtering (405), real ``func.HttpRequest`` objects in and ``func.HttpResponse``
  out (several ``Set-Cookie`` headers via ``resp.headers.add("Set-Cookie", ...)``), a request body
  limit (413) and ``500 Internal Server Error`` for unhandled exceptions;
* queue triggers polled from Azure Storage (Azurite) with the host's retry and poison behaviour;
* timer triggers (NCRONTAB or TimeSpan schedules, ``run_on_startup``);
* the admin endpoints ``POST /admin/functions/{name}`` (invoke a non-HTTP function, 202),
  ``GET /admin/functions`` and ``GET /admin/host/status``.

Honoured host.json keys: ``extensions.http.routePrefix``, ``extensions.http.maxRequestBodySize``
(bytes; else app setting ``FUNCTIONS_REQUEST_BODY_SIZE_LIMIT``; default 100 MB),
``extensions.http.customHeaders``, and ``extensions.queues.{batchSize, newBatchThreshold,
maxDequeueCount, visibilityTimeout, maxPollingInterval, messageEncoding}``.

CLI: ``python -m devtools.host [--port N] [--settings PATH] [--app MODULE:ATTR]
[--host-json PATH] [--no-triggers]``. Settings (``Values`` of ``local.settings.json``, else
``local.settings.sample.json``) are loaded into the environment before the app is imported;
variables already in the environment win.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import importlib
import inspect
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import typing
import uuid
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import azure.functions as func
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient, QueueServiceClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devtools._ncrontab import parse_schedule, parse_timespan
from devtools._routes import RouteTemplate, split_path
from devtools._serve import ServerThread
from devtools._triggers import QueueOptions, QueuePoller, TimerRunner, ensure_queue, utcnow

__all__ = [
    "FunctionInfo",
    "HostConfig",
    "LocalHost",
    "index_functions",
    "load_host_json",
    "load_local_settings",
    "main",
]

log = logging.getLogger("devtools.host")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 7071
DEFAULT_MAX_BODY = 100 * 1024 * 1024  # the Functions host's default request body limit
_HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]
_SETTING_REF = re.compile(r"%([^%]+)%")
# The storage SDK's default retry waits 15 s and more; the pollers retry on their own, and a
# local host should notice Azurite coming and going (and stop) quickly.
_RETRY: dict[str, Any] = {
    "retry_total": 1,
    "initial_backoff": 0.2,
    "increment_base": 1,
    "random_jitter_range": 0.1,
}


# ---------------------------------------------------------------------------------------------
# settings and host.json
# ---------------------------------------------------------------------------------------------


def _read_settings_file(repo_root: Path, path: str | Path | None) -> dict[str, Any]:
    if path is not None:
        chosen = Path(path)
        if not chosen.is_file():
            raise FileNotFoundError(f"settings file not found: {chosen}")
    else:
        candidates = [repo_root / "local.settings.json", repo_root / "local.settings.sample.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            return {}
        chosen = found[0]
    data = json.loads(chosen.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{chosen}: expected a JSON object")
    if data.get("IsEncrypted") is True:
        raise ValueError(f"{chosen}: encrypted settings are not supported by the local host")
    return data


def load_local_settings(
    repo_root: str | Path,
    path: str | Path | None = None,
    *,
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Load ``Values`` of the settings file into ``environ`` (default ``os.environ``).

    The file is ``path`` if given, else ``local.settings.json`` in ``repo_root``, else
    ``local.settings.sample.json``. Variables already present are kept (the environment wins).
    Returns the ``Values`` read from the file (as strings; empty if there is no file).
    """
    data = _read_settings_file(Path(repo_root), path)
    raw = data.get("Values") or {}
    if not isinstance(raw, dict):
        raise ValueError("settings: 'Values' must be an object")
    values = {str(k): "" if v is None else str(v) for k, v in raw.items()}
    target = os.environ if environ is None else environ
    for key, value in values.items():
        if key not in target:
            target[key] = value
    return values


def _ci_get(mapping: Mapping[str, Any] | None, key: str) -> Any:
    """Case-insensitive lookup (.NET configuration keys are case-insensitive)."""
    if not mapping:
        return None
    for k, v in mapping.items():
        if k.lower() == key.lower():
            return v
    return None


def load_host_json(source: Mapping[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """host.json as a dict: a mapping as is, a path read, None -> the repo's host.json (or {})."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source) if source is not None else REPO_ROOT / "host.json"
    if source is None and not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _seconds(value: Any, *, number_unit: float, default: float) -> float:
    """A TimeSpan string or a number (in ``number_unit`` seconds) as seconds."""
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) * number_unit
    return parse_timespan(str(value)).total_seconds()


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    max_request_body: int | None = DEFAULT_MAX_BODY
    custom_headers: Mapping[str, str] = field(default_factory=dict)
    queues: QueueOptions = field(default_factory=QueueOptions)

    @classmethod
    def from_host_json(cls, host_json: Mapping[str, Any]) -> HostConfig:
        extensions = _ci_get(host_json, "extensions") or {}
        http = _ci_get(extensions, "http") or {}
        queues = _ci_get(extensions, "queues") or {}

        prefix = _ci_get(http, "routePrefix")
        route_prefix = "api" if prefix is None else str(prefix).strip("/")

        limit = _ci_get(http, "maxRequestBodySize")
        if limit is None:
            limit = os.environ.get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT")
        max_body = DEFAULT_MAX_BODY if limit is None else int(limit)

        headers = _ci_get(http, "customHeaders") or {}

        batch_size = int(_ci_get(queues, "batchSize") or 16)
        threshold = _ci_get(queues, "newBatchThreshold")
        options = QueueOptions(
            batch_size=batch_size,
            new_batch_threshold=batch_size // 2 if threshold is None else int(threshold),
            max_dequeue_count=int(_ci_get(queues, "maxDequeueCount") or 5),
            visibility_timeout=_seconds(
                _ci_get(queues, "visibilityTimeout"), number_unit=1.0, default=0.0
            ),
            max_polling_interval=min(
                1.0,
                _seconds(_ci_get(queues, "maxPollingInterval"), number_unit=0.001, default=2.0),
            ),
            message_encoding=str(_ci_get(queues, "messageEncoding") or "base64"),
        )
        return cls(
            route_prefix=route_prefix,
            max_request_body=max_body if max_body > 0 else None,
            custom_headers={str(k): str(v) for k, v in dict(headers).items()},
            queues=options,
        )


def _resolve_setting_refs(text: str) -> str:
    """Resolve ``%NAME%`` binding expressions from app settings, as the host does."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise KeyError(f"app setting {name!r} (referenced as %{name}%) is not set")
        return os.environ[name]

    return _SETTING_REF.sub(repl, text)


def _queue_service(connection: str | None) -> QueueServiceClient:
    """A QueueServiceClient for a binding's ``connection`` (the NAME of a setting)."""
    name = connection or "AzureWebJobsStorage"
    for key in (f"AzureWebJobs{name}", name):
        value = os.environ.get(key)
        if value:
            return QueueServiceClient.from_connection_string(value, **_RETRY)
    uri = os.environ.get(f"{name}__queueServiceUri") or os.environ.get(f"{name}__serviceUri")
    account = os.environ.get(f"{name}__accountName")
    if not uri and account:
        uri = f"https://{account}.queue.core.windows.net"
    if uri:
        from azure.identity import DefaultAzureCredential

        return QueueServiceClient(uri, credential=DefaultAzureCredential(), **_RETRY)
    raise KeyError(f"storage connection setting {name!r} is not set")


# ---------------------------------------------------------------------------------------------
# function metadata
# ---------------------------------------------------------------------------------------------


@dataclass
class FunctionInfo:
    """One indexed function: its metadata as the host reads it and how to call it."""

    name: str
    function: Any  # azure.functions.decorators.function_app.Function
    user_function: Callable[..., Any]
    bindings: list[dict[str, Any]]
    trigger: dict[str, Any]
    is_async: bool
    context_param: str | None
    trigger_annotation: Any
    unbound_params: list[str]
    route: RouteTemplate | None = None
    methods: frozenset[str] | None = None

    @property
    def trigger_type(self) -> str:
        return str(self.trigger.get("type", ""))

    @property
    def is_http(self) -> bool:
        return self.trigger_type.lower() == "httptrigger"

    @property
    def out_bindings(self) -> list[dict[str, Any]]:
        return [b for b in self.bindings if str(b.get("direction", "")).upper() == "OUT"]


def index_functions(app: func.FunctionApp) -> list[FunctionInfo]:
    """Index the functions of ``app`` (including registered Blueprints) like the worker does."""
    if not hasattr(app, "get_functions"):
        raise TypeError("expected a func.FunctionApp (register Blueprints on it first)")
    # get_functions() records the names it saw and refuses to see them again; reset so that an
    # app can be served more than once in a process (for example by several tests).
    app.functions_bindings = None
    infos: list[FunctionInfo] = []
    for fn in app.get_functions():
        name = str(fn.get_function_name())
        bindings = json.loads(fn.get_function_json())["bindings"]
        trigger_obj = fn.get_trigger()
        trigger_name = trigger_obj.name if trigger_obj is not None else None
        trigger = next(
            (b for b in bindings if b.get("name") == trigger_name),
            next(b for b in bindings if str(b.get("type", "")).lower().endswith("trigger")),
        )
        user_function = fn.get_user_function()
        signature = inspect.signature(user_function)
        try:
            hints = typing.get_type_hints(user_function)
        except Exception:
            hints = {}
        binding_names = {b.get("name") for b in bindings}
        context_param: str | None = None
        unbound: list[str] = []
        for pname, param in signature.parameters.items():
            if pname in binding_names:
                continue
            annotation = hints.get(pname, param.annotation)
            is_context = pname == "context" or (
                isinstance(annotation, type) and issubclass(annotation, func.Context)
            )
            if is_context:
                context_param = pname
            elif param.default is inspect.Parameter.empty:
                unbound.append(pname)
        info = FunctionInfo(
            name=name,
            function=fn,
            user_function=user_function,
            bindings=bindings,
            trigger=trigger,
            is_async=inspect.iscoroutinefunction(user_function),
            context_param=context_param,
            trigger_annotation=hints.get(str(trigger.get("name"))),
            unbound_params=unbound,
        )
        if info.is_http:
            info.route = RouteTemplate(str(trigger.get("route") or name))
            methods = trigger.get("methods")
            if methods:
                info.methods = frozenset(str(m).upper() for m in methods)
        for b in bindings:
            kind = str(b.get("type", ""))
            direction = str(b.get("direction", "")).upper()
            supported = kind.lower() == "http" or (kind.lower() == "queue" and direction == "OUT")
            if b is trigger or supported:
                continue
            log.warning(
                "function %s: binding %r (%s) is not supported by the local host; "
                "it receives None",
                name,
                b.get("name"),
                kind,
            )
        for pname in unbound:
            log.warning(
                "function %s: parameter %r matches no binding; it receives None", name, pname
            )
        infos.append(info)
    return infos


# ---------------------------------------------------------------------------------------------
# invocation
# ---------------------------------------------------------------------------------------------

_thread_local = threading.local()


class _TraceContext(func._abc.TraceContext):
    def __init__(self, trace_parent: str, trace_state: str = "") -> None:
        self._parent = trace_parent
        self._state = trace_state

    @property
    def trace_state(self) -> str:
        return self._state

    @property
    def trace_parent(self) -> str:
        return self._parent

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(func._abc.RetryContext):
    @property
    def retry_count(self) -> int:
        return 0

    @property
    def max_retry_count(self) -> int:
        return 0

    @property
    def exception(self) -> Any:
        return None


class InvocationContext(func.Context):
    """The ``context`` argument, with the same properties the Python worker provides."""

    def __init__(
        self,
        *,
        invocation_id: str,
        function_name: str,
        function_directory: str,
        trace_parent: str,
        trigger_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._function_directory = function_directory
        self._trace = _TraceContext(trace_parent)
        self._retry = _RetryContext()
        self._trigger_metadata = dict(trigger_metadata or {})

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return _thread_local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> _TraceContext:
        return self._trace

    @property
    def retry_context(self) -> _RetryContext:
        return self._retry

    @property
    def trigger_metadata(self) -> dict[str, Any]:
        return self._trigger_metadata


class _Out(func.Out[Any]):
    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


def _function_directory(fn: Callable[..., Any]) -> str:
    try:
        return str(Path(inspect.getfile(fn)).resolve().parent)
    except (TypeError, OSError):
        return str(Path.cwd())


class _QueueOutputs:
    """Writes queue output bindings (``func.Out`` or ``$return``), encoded like the host."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._clients: dict[tuple[str, str], QueueClient] = {}
        self._lock = threading.Lock()

    def _client(self, connection: str | None, queue_name: str) -> QueueClient:
        key = (connection or "", queue_name)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = _queue_service(connection).get_queue_client(queue_name)
                ensure_queue(client)
                self._clients[key] = client
            return client

    def _encode(self, item: Any) -> str:
        if isinstance(item, func.QueueMessage):
            item = item.get_body()
        if isinstance(item, dict | list):
            item = json.dumps(item)
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        if self._encoding.lower() == "none":
            return data.decode("utf-8")
        return base64.b64encode(data).decode("ascii")

    def send(self, binding: Mapping[str, Any], value: Any) -> None:
        if value is None:
            return
        items = value if isinstance(value, list | tuple) else [value]
        client = self._client(
            binding.get("connection"), _resolve_setting_refs(str(binding["queueName"]))
        )
        for item in items:
            client.send_message(self._encode(item))


class _Invoker:
    """Calls user functions: sync ones in worker threads, async ones on one event loop."""

    def __init__(self, config: HostConfig) -> None:
        self._outputs = _QueueOutputs(config.queues.message_encoding)
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="function")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="function-loop", daemon=True
        )

    def start(self) -> None:
        self._loop_thread.start()

    def stop(self) -> None:
        self.executor.shutdown(wait=True)
        if self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def _adapt_trigger(self, info: FunctionInfo, value: Any) -> Any:
        annotation = info.trigger_annotation
        if isinstance(value, func.QueueMessage):
            if annotation is str:
                return value.get_body().decode("utf-8")
            if annotation is bytes:
                return value.get_body()
        return value

    def invoke(
        self,
        info: FunctionInfo,
        trigger_value: Any,
        *,
        trigger_metadata: Mapping[str, Any] | None = None,
        trace_parent: str | None = None,
    ) -> Any:
        """Run the function to completion in the calling thread; returns its result."""
        invocation_id = str(uuid.uuid4())
        trigger_name = str(info.trigger["name"])
        kwargs: dict[str, Any] = {trigger_name: self._adapt_trigger(info, trigger_value)}
        outs: dict[str, _Out] = {}
        for binding in info.out_bindings:
            name = str(binding.get("name"))
            if name != "$return":
                outs[name] = kwargs[name] = _Out()
        for binding in info.bindings:
            name = str(binding.get("name"))
            if name not in kwargs and name != "$return" and binding is not info.trigger:
                kwargs[name] = None
        for pname in info.unbound_params:
            kwargs[pname] = None
        if info.context_param is not None:
            kwargs[info.context_param] = InvocationContext(
                invocation_id=invocation_id,
                function_name=info.name,
                function_directory=_function_directory(info.user_function),
                trace_parent=trace_parent
                or f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00",
                trigger_metadata=trigger_metadata,
            )
        started = time.perf_counter()
        level = logging.DEBUG if info.is_http else logging.INFO
        log.log(level, "Executing 'Functions.%s' (Id=%s)", info.name, invocation_id)
        try:
            if info.is_async:
                coro = info.user_function(**kwargs)
                result = asyncio.run_coroutine_threadsafe(coro, self._loop).result()
            else:
                _thread_local.invocation_id = invocation_id
                result = info.user_function(**kwargs)
            for binding in info.out_bindings:
                name = str(binding.get("name"))
                kind = str(binding.get("type", "")).lower()
                value = result if name == "$return" else outs[name].get()
                if kind == "queue":
                    self._outputs.send(binding, value)
                elif kind == "http" and name != "$return" and info.is_http:
                    result = value
        except Exception:
            log.exception(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms)",
                info.name,
                invocation_id,
                (time.perf_counter() - started) * 1000,
            )
            raise
        finally:
            if not info.is_async:
                _thread_local.invocation_id = None
        log.log(
            level,
            "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)",
            info.name,
            invocation_id,
            (time.perf_counter() - started) * 1000,
        )
        return result

    async def invoke_async(self, info: FunctionInfo, trigger_value: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, lambda: self.invoke(info, trigger_value, **kw)
        )

    def submit(self, info: FunctionInfo, trigger_value: Any) -> None:
        """Invoke in the background; failures are logged (the host's admin invocation)."""

        def run() -> None:
            with contextlib.suppress(Exception):
                self.invoke(info, trigger_value)

        self.executor.submit(run)


def _timer_request() -> TimerRequest:
    now = utcnow().isoformat()
    return TimerRequest(
        past_due=False,
        schedule_status={"Last": now, "Next": now, "LastUpdated": now},
        schedule={"AdjustForDST": True},
    )


def _queue_message(data: str | bytes | None) -> func.QueueMessage:
    now = utcnow()
    return QueueMessage(  # type: ignore[no-untyped-call]
        id=str(uuid.uuid4()),
        body=data if data is not None else b"",
        dequeue_count=1,
        insertion_time=now,
        expiration_time=now + dt.timedelta(days=7),
        time_next_visible=now + dt.timedelta(minutes=10),
        pop_receipt=secrets.token_urlsafe(12),
    )


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class _AccessLog:
    """One line per request: method, path (never the query string), status, milliseconds."""

    def __init__(self, app: ASGIApp, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info(
                "%s %s %d %.1fms",
                scope.get("method", "-"),
                scope.get("path", "-"),
                status,
                (time.perf_counter() - started) * 1000,
            )


def _internal_error() -> Response:
    return PlainTextResponse("Internal Server Error", status_code=500)


def _to_http_response(result: Any, custom_headers: Mapping[str, str]) -> Response:
    """Translate a function's return value as the worker and host do."""
    raw: list[tuple[bytes, bytes]] = []
    if result is None:
        response = Response(status_code=204)
    elif isinstance(result, str):
        response = Response(result.encode("utf-8"), 200, media_type="text/plain; charset=utf-8")
    elif isinstance(result, func._abc.HttpResponse):
        headers: dict[str, tuple[str, str]] = {}  # lower name -> (name, value); last one wins
        cookies: list[str] = []
        for key, value in result.headers.items():
            lower = str(key).lower()
            if lower == "set-cookie":
                cookies.append(str(value))
            elif lower not in ("content-length", "transfer-encoding"):
                headers[lower] = (str(key), str(value))
        if "content-type" not in headers:
            mimetype = str(result.mimetype)
            text = mimetype.startswith("text/")
            ctype = f"{mimetype}; charset={result.charset}" if text else mimetype
            headers["content-type"] = ("Content-Type", ctype)
        response = Response(result.get_body() or b"", int(result.status_code))
        for name, value in headers.values():
            raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        raw.extend((b"set-cookie", c.encode("latin-1")) for c in cookies)
    else:
        raise TypeError(
            f"an HTTP function must return func.HttpResponse or str, got {type(result).__name__}"
        )
    present = {name for name, _ in raw} | {name for name, _ in response.raw_headers}
    for name, value in custom_headers.items():
        if name.lower().encode("latin-1") not in present:
            raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    response.raw_headers.extend(raw)
    return response


# ---------------------------------------------------------------------------------------------
# the host
# ---------------------------------------------------------------------------------------------


class LocalHost:
    """Serve a FunctionApp locally: HTTP on 127.0.0.1, plus queue and timer listeners.

    ``url`` (``http://127.0.0.1:{port}``, no route prefix) is known as soon as the object exists;
    ``api_url`` adds the route prefix. Use as a context manager or call ``start()``/``stop()``.
    ``host_json``: a dict, a path, or None for the repo's host.json (defaults if absent).
    """

    def __init__(
        self,
        app: func.FunctionApp,
        *,
        port: int = 0,
        host_json: Mapping[str, Any] | str | Path | None = None,
        run_triggers: bool = True,
        log_requests: bool = True,
    ) -> None:
        self.config = HostConfig.from_host_json(load_host_json(host_json))
        self.functions = index_functions(app)
        self._by_name = {f.name.lower(): f for f in self.functions}
        self._http = sorted(
            (f for f in self.functions if f.is_http),
            key=lambda f: f.route.precedence if f.route else (),
        )
        self.run_triggers = run_triggers
        self._invoker = _Invoker(self.config)
        self._pollers: list[QueuePoller] = []
        self._timers: list[TimerRunner] = []
        self._started_at = time.monotonic()
        self._state = "Created"
        self._lock = threading.Lock()
        asgi = Starlette(
            routes=[
                Route("/admin/host/status", self._admin_status, methods=["GET"]),
                Route("/admin/functions", self._admin_list, methods=["GET"]),
                Route("/admin/functions/{name}", self._admin_invoke, methods=["POST"]),
                Route("/{path:path}", self._dispatch, methods=_HTTP_METHODS),
            ]
        )
        self._server = ServerThread(
            _AccessLog(asgi, log_requests), port=port, name="functions-host"
        )
        self.port = self._server.port
        self.url = self._server.url

    @property
    def api_url(self) -> str:
        prefix = self.config.route_prefix
        return f"{self.url}/{prefix}" if prefix else self.url

    def function(self, name: str) -> FunctionInfo:
        try:
            return self._by_name[name.lower()]
        except KeyError:
            raise KeyError(f"no function named {name!r}") from None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalHost:
        with self._lock:
            if self._state != "Created":
                raise RuntimeError(f"host already {self._state.lower()}")
            self._state = "Starting"
        if not log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            if log.level == logging.NOTSET:
                log.setLevel(logging.INFO)
        self._invoker.start()
        self._server.start()
        if self.run_triggers:
            self._start_triggers()
        self._state = "Running"
        return self

    def _start_triggers(self) -> None:
        for info in self.functions:
            kind = info.trigger_type.lower()
            try:
                if kind == "queuetrigger":
                    poller = QueuePoller(
                        function_name=info.name,
                        queue_name=_resolve_setting_refs(str(info.trigger["queueName"])),
                        service=_queue_service(info.trigger.get("connection")),
                        options=self.config.queues,
                        invoke=self._invoker_for(info),
                    )
                    poller.start()
                    self._pollers.append(poller)
                elif kind == "timertrigger":
                    runner = TimerRunner(
                        function_name=info.name,
                        schedule=parse_schedule(_resolve_setting_refs(str(info.trigger["schedule"]))),
                        run_on_startup=bool(info.trigger.get("runOnStartup", False)),
                        invoke=self._invoker_for(info),
                    )
                    runner.start()
                    self._timers.append(runner)
                elif not info.is_http:
                    log.warning(
                        "function %s: trigger %s is not supported locally (admin invocation only)",
                        info.name,
                        info.trigger_type,
                    )
            except Exception as exc:
                # Like the real host: the function is in error, the host keeps running.
                log.error("The '%s' function is in error: %s", info.name, exc)

    def _invoker_for(self, info: FunctionInfo) -> Callable[[Any], None]:
        def invoke(value: Any) -> None:
            metadata: dict[str, Any] = {}
            if isinstance(value, func.QueueMessage):
                metadata = {
                    "Id": value.id,
                    "DequeueCount": value.dequeue_count,
                    "PopReceipt": value.pop_receipt,
                }
            self._invoker.invoke(info, value, trigger_metadata=metadata)

        return invoke

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listeners (letting running messages finish), then the server, then workers."""
        with self._lock:
            if self._state in ("Stopped", "Created"):
                self._state = "Stopped"
                return
            self._state = "Stopping"
        listeners: list[QueuePoller | TimerRunner] = [*self._pollers, *self._timers]
        for listener in listeners:
            listener.signal_stop()
        for listener in listeners:
            listener.stop(timeout)
        self._server.stop(timeout=timeout)
        self._invoker.stop()
        self._state = "Stopped"

    def __enter__(self) -> LocalHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- direct invocation -----------------------------------------------------------------------

    def _trigger_value(self, info: FunctionInfo, data: Any) -> Any:
        kind = info.trigger_type.lower()
        if kind == "timertrigger":
            return _timer_request()
        if kind == "queuetrigger":
            if isinstance(data, func.QueueMessage):
                return data
            if data is not None and not isinstance(data, str | bytes):
                data = json.dumps(data)
            return _queue_message(data)
        return data

    def run_function(self, name: str, input: Any = None) -> Any:
        """Invoke a non-HTTP function now, in this thread; returns its result or raises."""
        info = self.function(name)
        if info.is_http:
            raise ValueError(f"{name} is an HTTP function: call it over HTTP at {self.api_url}")
        return self._invoker.invoke(info, self._trigger_value(info, input))

    # -- admin endpoints -------------------------------------------------------------------------

    async def _admin_status(self, request: Request) -> Response:
        return JSONResponse(
            {
                "id": "devtools-local-host",
                "state": self._state,
                "version": "devtools",
                "processUptime": int((time.monotonic() - self._started_at) * 1000),
            }
        )

    async def _admin_list(self, request: Request) -> Response:
        return JSONResponse(
            [
                {
                    "name": f.name,
                    "config": {"bindings": f.bindings},
                    "invoke_url_template": (
                        f"{self.api_url}/{f.route.template}" if f.route is not None else None
                    ),
                }
                for f in self.functions
            ]
        )

    async def _admin_invoke(self, request: Request) -> Response:
        info = self._by_name.get(str(request.path_params["name"]).lower())
        if info is None:
            return Response(status_code=404)
        if info.is_http:
            return PlainTextResponse(
                "HTTP functions are invoked over HTTP, not through the admin endpoint",
                status_code=400,
            )
        raw = await request.body()
        data: Any = None
        if raw.strip():
            try:
                payload = json.loads(raw)
            except ValueError:
                return PlainTextResponse("body must be JSON: {\"input\": \"...\"}", status_code=400)
            if isinstance(payload, dict):
                data = payload.get("input")
        self._invoker.submit(info, self._trigger_value(info, data))
        return Response(status_code=202)

    # -- HTTP triggers ---------------------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_body
        declared = request.headers.get("content-length")
        if limit is not None and declared and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if limit is not None and size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _landing_page(self) -> Response:
        return Response(
            "<html><body><h1>Your Functions app is up and running</h1>"
            "<p>devtools.host (local Azure Functions host)</p></body></html>",
            media_type="text/html",
        )

    async def _dispatch(self, request: Request) -> Response:
        scope = request.scope
        raw_path = (scope.get("raw_path") or scope["path"].encode("utf-8")).split(b"?", 1)[0]
        segments = split_path(raw_path.decode("latin-1"))
        prefix = split_path(self.config.route_prefix)
        if [s.lower() for s in segments[: len(prefix)]] != [p.lower() for p in prefix]:
            if not segments and prefix and request.method in ("GET", "HEAD"):
                return self._landing_page()
            return Response(status_code=404)
        rest = segments[len(prefix) :]
        candidates = [
            (info, values)
            for info in self._http
            if info.route is not None and (values := info.route.match(rest)) is not None
        ]
        if not candidates:
            if not segments and request.method in ("GET", "HEAD"):
                return self._landing_page()
            return Response(status_code=404)
        method = request.method.upper()
        chosen = next(
            ((i, v) for i, v in candidates if i.methods is None or method in i.methods), None
        )
        if chosen is None:
            allowed = sorted({m for i, _ in candidates for m in (i.methods or ())})
            return Response(status_code=405, headers={"Allow": ", ".join(allowed)})
        info, route_values = chosen
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            return PlainTextResponse("Request Entity Too Large", status_code=413)

        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            name = key.decode("latin-1").lower()
            text = value.decode("latin-1")
            if name in headers:
                headers[name] += ("; " if name == "cookie" else ",") + text
            else:
                headers[name] = text
        params: dict[str, str] = {}
        query = scope.get("query_string", b"").decode("latin-1")
        for key, value in parse_qsl(query, keep_blank_values=True):
            params[key] = f"{params[key]},{value}" if key in params else value
        host_header = headers.get("host") or f"127.0.0.1:{self.port}"
        url = f"{scope.get('scheme', 'http')}://{host_header}{raw_path.decode('latin-1')}"
        if query:
            url += f"?{query}"
        http_request = func.HttpRequest(
            method=method,
            url=url,
            headers=headers,
            params=params,
            route_params=route_values,
            body=body,
        )
        try:
            result = await self._invoker.invoke_async(
                info, http_request, trace_parent=headers.get("traceparent")
            )
        except Exception:
            # The invoker logged the traceback (to stderr); the client sees no details.
            return _internal_error()
        try:
            return _to_http_response(result, self.config.custom_headers)
        except Exception:
            log.exception("function %s: invalid HTTP response", info.name)
            return _internal_error()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _load_app(spec: str) -> func.FunctionApp:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attr or "app")
    if not hasattr(app, "get_functions"):
        raise TypeError(f"{spec} is not a func.FunctionApp")
    return typing.cast(func.FunctionApp, app)


def _describe(host: LocalHost) -> str:
    lines = ["", "Functions:", ""]
    for info in host.functions:
        if info.is_http and info.route is not None:
            methods = ",".join(sorted(info.methods)) if info.methods else "ALL"
            lines.append(f"\t{info.name}: [{methods}] {host.api_url}/{info.route.template}")
        else:
            lines.append(f"\t{info.name}: {info.trigger_type}")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.host", description="Local Azure Functions host (func start)."
    )
    parser.add_argument(
        "--port", type=int, default=None, help="default: Host.LocalHttpPort or 7071"
    )
    parser.add_argument("--settings", default=None, help="settings file (local.settings.json)")
    parser.add_argument("--app", default="function_app:app", help="MODULE:ATTR of the FunctionApp")
    parser.add_argument("--host-json", default=None, help="default: host.json in the repo root")
    parser.add_argument("--no-triggers", action="store_true", help="serve HTTP functions only")
    parser.add_argument("--repo-root", default=str(REPO_ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=os.environ.get("DEVTOOLS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("azure").setLevel(logging.WARNING)
    repo_root = Path(args.repo_root).resolve()
    settings = _read_settings_file(repo_root, args.settings)
    load_local_settings(repo_root, args.settings)
    port = args.port
    if port is None:
        port = int(_ci_get(settings.get("Host"), "LocalHttpPort") or DEFAULT_PORT)
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    app = _load_app(args.app)
    default_host_json = repo_root / "host.json"
    host_json: str | Path | dict[str, Any] = args.host_json or (
        default_host_json if default_host_json.is_file() else {}
    )
    host = LocalHost(app, port=port, host_json=host_json, run_triggers=not args.no_triggers)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    host.start()
    print(_describe(host), flush=True)
    print(f"Host started: {host.url} (functions under {host.api_url})", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping")
        host.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
