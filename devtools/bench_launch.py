"""The launch part of ``make bench``: what the connector adds to a clinician's launch.

Everything runs locally: Azurite (tables, queues), the sandbox (EHR, Entra over HTTPS, Graph)
and the local Functions host. Two ways of measuring, each on a fresh worker (a new container:
discovery, JWKS, Graph token, config and mapping caches cold for its first launch):

**Like a browser, through the host** (figures ``browser: ...``; runs first, so its first launch
also pays the first imports of the modules a launch needs, as a new worker's does). One httpx
client with keep-alive connections and a cookie jar that sends ``Secure`` cookies to
http://127.0.0.1 as browsers do, following the real redirects: the connector's launch URL ->
the sandbox EHR's authorize (it answers a 302 straight back) -> the connector's callback -> 302
to the Graph stand-in's joinWebUrl (not fetched). Connector-added time = the wall time of the
browser's two requests to the connector (``Response.elapsed``) minus the stand-ins' own handler
time spent inside them: every stand-in is wrapped by ``devtools._timing.timed`` (the EHR's token
endpoint, Graph's createOrGet, Entra, whatever the connector calls synchronously), and so is the
host, so a stand-in calling back into the connector (the EHR fetching the connector's JWKS,
Graph validating the webhook) does not count as stand-in time. Storage (Azurite) is not a
stand-in: its time stays in connector-added and is reported beside it. The local host's own
overhead (ASGI to ``func.HttpRequest`` and back, its thread pool) is in connector-added too.

**In-process** (the other figures): the launch functions called with real ``func.HttpRequest``
objects, the browser's hop to the EHR's authorize endpoint made in between (not counted);
connector-added = the two function calls' wall time minus the time inside table operations,
queue writes and outbound calls (timed client-side by wrappers: the table store and queue, a
transport around both of the connector's httpx clients, ``requests.Session.send`` for msal).
Only the bench thread's operations count (the host's threads serve the stand-ins' callbacks).

Both count table operations (the same ops as billing) through a wrapper of the container's table
store, and outbound calls per kind. Scenario, per measured launch: a repeat clinician (mapped)
launches a new visit on a warm worker, then launches it again (the meeting exists); like a
browser, the visit's patient then launches it too (another browser; the meeting exists and this
worker has seen it: ``browser: patient, ...``).
``run_launch_bench`` prints nothing; ``devtools/bench.py`` prints its figures.
"""

from __future__ import annotations

import contextlib
import gc
import http.cookiejar
import os
import statistics
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx

from devtools._timing import ClockReading, HandlerClock, timed

if TYPE_CHECKING:
    from devtools.sandbox import Sandbox

__all__ = ["connector_stack", "run_launch_bench"]

PRACTITIONER = "prac-7f3a91c2"
PATIENT = "pat-3c9e1f40"
STAND_INS = ("ehr", "entra", "graph")
# Host labels: the browser's own requests, and the stand-ins' calls back into the connector
# made while they handle the connector's calls (JWKS fetch, webhook validation).
CONNECTOR = "connector"
CALLED_BACK = "connector (called back)"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@dataclass
class _Meter:
    """Counts and times storage and outbound calls while armed: the bench thread's only, or
    (``thread=None``) every thread's, for a launch served by the host's threads."""

    thread: int | None = field(default_factory=threading.get_ident)
    armed: bool = False
    table_ops: int = 0
    queue_messages: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    inside_s: float = 0.0  # storage and outbound calls
    storage_s: float = 0.0  # of which storage (tables, queues)
    storage_cpu_s: float = 0.0  # of that, the storage SDK's CPU time in the calling thread
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self._lock:
            self.table_ops = 0
            self.queue_messages = 0
            self.calls = Counter()
            self.inside_s = 0.0
            self.storage_s = 0.0
            self.storage_cpu_s = 0.0

    def mine(self) -> bool:
        return self.armed and (self.thread is None or threading.get_ident() == self.thread)

    def add_storage(self, seconds: float, cpu_seconds: float, *, table: bool) -> None:
        with self._lock:
            self.inside_s += seconds
            self.storage_s += seconds
            self.storage_cpu_s += cpu_seconds
            if table:
                self.table_ops += 1
            else:
                self.queue_messages += 1

    def add_call(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.inside_s += seconds
            self.calls[kind] += 1


_TABLE_OPS = frozenset(
    {
        "get_entity",
        "create_entity",
        "update_entity",
        "upsert_entity",
        "delete_entity",
        "list_entities",
        "submit_transaction",
    }
)


class _CountingStorage:
    """EntityStore / MessageQueue wrapper: counts and times every operation in ``ops``."""

    def __init__(self, inner: Any, meter: _Meter, ops: frozenset[str], *, table: bool) -> None:
        self._inner = inner
        self._meter = meter
        self._ops = ops
        self._table = table

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name not in self._ops:
            return target

        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self._meter.mine():
                return target(*args, **kwargs)
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return target(*args, **kwargs)
            finally:
                self._meter.add_storage(
                    time.perf_counter() - started, time.thread_time() - cpu, table=self._table
                )

        return counted


class _TimingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, meter: _Meter, names: dict[str, str]) -> None:
        self._inner = inner
        self._meter = meter
        self._names = names

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self._meter.mine():
            return self._inner.handle_request(request)
        started = time.perf_counter()
        response = self._inner.handle_request(request)
        response.read()
        self._meter.add_call(_classify(self._names, request.url), time.perf_counter() - started)
        return response

    def close(self) -> None:
        self._inner.close()


def _time_client(client: httpx.Client, meter: _Meter, names: dict[str, str]) -> None:
    """Count and time the calls ``client`` makes (its own transport, wrapped in place: the
    guarded EHR client keeps its address checks, the Graph client its pool limits)."""
    client._transport = _TimingTransport(client._transport, meter, names)


def _classify(names: dict[str, str], url: httpx.URL | str) -> str:
    parsed = urlsplit(str(url))
    service = names.get(f"{parsed.scheme}://{parsed.netloc}", parsed.netloc)
    path = parsed.path
    if service == "ehr":
        if path.endswith("smart-configuration"):
            return "ehr discovery"
        if "jwks" in path:
            return "ehr jwks"
        if path.endswith("/token"):
            return "ehr token"
        return "ehr other"
    if service == "graph":
        if path.endswith("/createOrGet"):
            return "graph createOrGet"
        if path.endswith("/subscriptions"):
            return "graph subscription"
        return "graph other"
    if service == "entra":
        return "entra"
    return f"other {parsed.netloc}"


@contextlib.contextmanager
def _patched_requests(meter: _Meter, names: dict[str, str]) -> Iterator[None]:
    """msal speaks requests: count and time its calls (Entra discovery and tokens)."""
    import requests

    original = requests.Session.send

    def send(self: requests.Session, request: Any, **kwargs: Any) -> Any:
        # The Azure SDK speaks requests too (storage is timed by the storage wrappers): this
        # runs inside every storage operation, so it looks at the URL only when armed.
        kind = _classify(names, str(request.url)) if meter.mine() else "other"
        if kind.startswith("other"):
            return original(self, request, **kwargs)
        started = time.perf_counter()
        try:
            return original(self, request, **kwargs)
        finally:
            meter.add_call(kind, time.perf_counter() - started)

    requests.Session.send = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        requests.Session.send = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _timed_host(clock: HandlerClock) -> Iterator[None]:
    """LocalHost instances made inside serve their ASGI app wrapped by ``timed`` (labels
    ``CONNECTOR`` for the browser's launch requests, ``CALLED_BACK`` for everything else)."""
    import devtools.host as host_module

    original = host_module.ServerThread

    def label(scope: Any) -> str:
        return CONNECTOR if str(scope.get("path", "")).startswith("/api/launch/") else CALLED_BACK

    def server(app: Any, **kwargs: Any) -> Any:
        return original(timed(app, clock, label), **kwargs)

    host_module.ServerThread = server  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        host_module.ServerThread = original  # type: ignore[misc]


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The local host logs every request; the bench's output is its figures only."""
    import logging

    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connector_stack(
    stack: contextlib.ExitStack, url: str, **settings: str
) -> tuple[Sandbox, dict[str, str]]:
    """Azurite, the sandbox and the connector's settings in ``os.environ`` (its logs quiet)
    for a bench's connector at ``url``, each undone when ``stack`` closes; ``settings``
    override. Returns the sandbox and the settings."""
    from devtools.azurite import Azurite
    from devtools.dev_secrets import dev_secret_settings
    from devtools.sandbox import Sandbox

    stack.enter_context(_quiet("devtools.host", "connector", "azure"))
    azurite = stack.enter_context(Azurite())
    sandbox = stack.enter_context(Sandbox(connector_url=url))
    env = {
        "CONNECTOR_REGION": "americas",
        "CONNECTOR_PUBLIC_URL": url,
        "CONNECTOR_STORAGE": azurite.connection_string,
        "CONNECTOR_DEV_MODE": "1",
        **dev_secret_settings(),
        **sandbox.connector_settings(),
        **settings,
    }
    stack.enter_context(_environ(env))
    return sandbox, env


@contextlib.contextmanager
def _bench_appointments(count: int) -> Iterator[list[str]]:
    """Extra appointments (new visits) for the bench, in the sandbox seed, removed afterwards."""
    from devtools.sandbox import seed

    template = seed.APPOINTMENTS["appt-0c7d5e82"]
    ids = [f"appt-bench-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for appointment_id in ids:
        seed.APPOINTMENTS[appointment_id] = replace(
            template, id=appointment_id, practitioner_id=PRACTITIONER, patient_id=PATIENT
        )
    try:
        yield ids
    finally:
        for appointment_id in ids:
            seed.APPOINTMENTS.pop(appointment_id, None)


@dataclass
class _Launch:
    total_ms: float  # wall time of the connector's part (function calls, or browser requests)
    added_ms: float
    table_ops: int
    calls: Counter[str]
    queue_messages: int = 0
    storage_ms: float = 0.0
    storage_cpu_ms: float = 0.0
    outbound_ms: float = 0.0  # outbound calls, timed by the connector's side (client)
    stand_ins_ms: float = 0.0  # the stand-ins' own handler time (browser-like launches)
    stand_in_requests: dict[str, int] = field(default_factory=dict)


# --- in-process -----------------------------------------------------------------------------


def _request(url: str, *, params: dict[str, str], route: dict[str, str], cookie: str) -> Any:
    import azure.functions as func

    return func.HttpRequest(
        method="GET",
        url=url,
        params=params,
        route_params=route,
        headers={"cookie": cookie} if cookie else {},
        body=b"",
    )


def _one_launch(
    *, meter: _Meter, api: str, launch_url: str, config_id: str, browser: httpx.Client
) -> _Launch:
    from functions import launch

    query = {k: v[0] for k, v in parse_qs(urlsplit(launch_url).query).items()}
    meter.reset()
    meter.armed = True
    started = time.perf_counter()
    first = launch.launch_provider(
        _request(
            f"{api}/launch/provider/{config_id}",
            params=query,
            route={"configId": config_id},
            cookie="",
        )
    )
    first_s = time.perf_counter() - started
    meter.armed = False
    assert first.status_code == 302, first.get_body()[:300]
    cookie = "; ".join(
        v.split(";", 1)[0] for k, v in first.headers.items() if k.lower() == "set-cookie"
    )
    at_ehr = browser.get(first.headers["Location"])  # the browser's hop: not the connector's
    assert at_ehr.status_code == 302, at_ehr.text[:300]
    callback = urlsplit(at_ehr.headers["location"])
    meter.armed = True
    started = time.perf_counter()
    second = launch.launch_callback(
        _request(
            f"{api}/launch/callback",
            params={k: v[0] for k, v in parse_qs(callback.query).items()},
            route={},
            cookie=cookie,
        )
    )
    second_s = time.perf_counter() - started
    meter.armed = False
    assert second.status_code == 302, second.get_body()[:500]
    total_ms = (first_s + second_s) * 1000
    return _Launch(
        total_ms=total_ms,
        added_ms=total_ms - meter.inside_s * 1000,
        table_ops=meter.table_ops,
        calls=Counter(meter.calls),
        queue_messages=meter.queue_messages,
        storage_ms=meter.storage_s * 1000,
    )


# --- like a browser, through the host -------------------------------------------------------


class _BrowserCookiePolicy(http.cookiejar.DefaultCookiePolicy):
    """As browsers do: loopback http is a secure context, so ``Secure`` cookies are sent there."""

    def return_ok_secure(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        host = urlsplit(request.get_full_url()).hostname or ""
        if cookie.secure and host in _LOOPBACK:
            return True
        return bool(super().return_ok_secure(cookie, request))


class _Browser:
    """One browser: keep-alive connections, a cookie jar, no automatic redirects (each hop is
    made, and timed, by the bench)."""

    def __init__(self) -> None:
        self.jar = http.cookiejar.CookieJar(policy=_BrowserCookiePolicy())
        self.client = httpx.Client(
            cookies=self.jar,
            follow_redirects=False,
            timeout=30.0,
            headers={
                "User-Agent": "Mozilla/5.0 (bench browser)",
                "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
                "Sec-Fetch-Dest": "document",
                "Sec-Fetch-Mode": "navigate",
            },
            event_hooks={"request": [self._cookie_header]},
        )

    def _cookie_header(self, request: httpx.Request) -> None:
        # httpx copies the jar into one with the default policy (no Secure cookies over http):
        # build the Cookie header from this jar, with the browser-like policy, instead.
        probe = urllib.request.Request(str(request.url))
        self.jar.add_cookie_header(probe)
        request.headers.pop("cookie", None)
        header = probe.get_header("Cookie")
        if header:
            request.headers["Cookie"] = header

    def get(self, url: str) -> httpx.Response:
        return self.client.get(url)

    def close(self) -> None:
        self.client.close()


def connector_share(wall_s: float, spent: ClockReading) -> tuple[float, float]:
    """(connector-added, stand-ins' own) seconds of a browser request to the connector that took
    ``wall_s``, given the handler time ``spent`` meanwhile: the stand-ins' time, less the
    connector's own handling of their calls back into it (which is the connector's)."""
    stand_ins = spent.seconds_of(*STAND_INS) - spent.seconds_of(CALLED_BACK)
    return wall_s - stand_ins, stand_ins


def _browser_launch(
    *,
    browser: _Browser,
    clock: HandlerClock,
    meter: _Meter,
    launch_url: str,
    landings: tuple[str, ...],
) -> _Launch:
    meter.reset()
    wall_s = added_s = stand_ins_s = 0.0
    spent_total = ClockReading()

    def to_connector(url: str) -> httpx.Response:
        nonlocal wall_s, added_s, stand_ins_s, spent_total
        before = clock.reading()
        meter.armed = True
        response = browser.get(url)
        spent = clock.reading() - before  # waits until the host's handler has returned too
        meter.armed = False
        assert spent.requests_of(CONNECTOR) == 1, spent
        wall = response.elapsed.total_seconds()
        added, stand_ins = connector_share(wall, spent)
        wall_s += wall
        added_s += added
        stand_ins_s += stand_ins
        spent_total = spent_total + spent
        return response

    first = to_connector(launch_url)
    assert first.status_code == 302, first.text[:300]
    at_ehr = browser.get(first.headers["location"])  # the EHR's authorize: not the connector's
    assert at_ehr.status_code == 302, at_ehr.text[:300]
    done = to_connector(at_ehr.headers["location"])
    # The connector's last answer: a redirect to the clinician's visit page or straight into
    # the meeting (the config's landing); what the browser loads next is not the launch's.
    assert done.status_code == 302, done.text[:500]
    assert done.headers["location"].startswith(landings), done.headers["location"]
    return _Launch(
        total_ms=wall_s * 1000,
        added_ms=added_s * 1000,
        table_ops=meter.table_ops,
        calls=Counter(meter.calls),
        queue_messages=meter.queue_messages,
        storage_ms=meter.storage_s * 1000,
        storage_cpu_ms=meter.storage_cpu_s * 1000,
        outbound_ms=(meter.inside_s - meter.storage_s) * 1000,
        stand_ins_ms=stand_ins_s * 1000,
        stand_in_requests={k: spent_total.requests_of(k) for k in (*STAND_INS, CALLED_BACK)},
    )


# --- figures --------------------------------------------------------------------------------


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def _figure(name: str, value: float, unit: str, budget: str, ok: bool) -> dict[str, Any]:
    return {
        "section": "launch",
        "name": name,
        "value": round(value, 2),
        "unit": unit,
        "budget": budget,
        "ok": bool(ok),
    }


def _at_most(name: str, value: float, unit: str, limit: float) -> dict[str, Any]:
    return _figure(name, value, unit, f"<= {limit:g}", value <= limit)


def _in_process_figures(
    cold: _Launch, new_visits: list[_Launch], repeats: list[_Launch]
) -> list[dict[str, Any]]:
    added = [run.added_ms for run in new_visits]
    total = [run.total_ms for run in new_visits]
    repeat_added = [run.added_ms for run in repeats]
    ops_new = max(run.table_ops for run in new_visits)
    ops_repeat = max(run.table_ops for run in repeats)
    cached_fetches = sum(
        run.calls["ehr discovery"] + run.calls["ehr jwks"] + run.calls["entra"]
        for run in new_visits + repeats
    )
    ehr_new = [run.calls["ehr token"] for run in new_visits]
    ehr_other = sum(run.calls["ehr other"] for run in new_visits + repeats)
    graph_new = [
        (run.calls["graph createOrGet"], run.calls["graph subscription"]) for run in new_visits
    ]
    graph_repeat = [
        (run.calls["graph createOrGet"], run.calls["graph subscription"]) for run in repeats
    ]
    return [
        _figure("new visit: connector-added p50", statistics.median(added), "ms", "-", True),
        _figure("new visit: connector-added p95", _p95(added), "ms", "< 50", _p95(added) < 50),
        _figure(
            "new visit: total p50 (incl. stand-ins)", statistics.median(total), "ms", "-", True
        ),
        _at_most("new visit: table operations", ops_new, "count", 2),
        _figure(
            "new visit: EHR calls (token exchange)",
            max(ehr_new) + ehr_other,
            "count",
            "== 1",
            set(ehr_new) == {1} and ehr_other == 0,
        ),
        _figure(
            # the meeting's subscription is the queue worker's, not the clinician's wait
            "new visit: Graph calls (createOrGet only)",
            max(a + b for a, b in graph_new),
            "count",
            "== 1",
            set(graph_new) == {(1, 0)},
        ),
        _figure(
            "discovery/JWKS/Graph-token fetches, warm",
            cached_fetches,
            "count",
            "== 0",
            cached_fetches == 0,
        ),
        _figure(
            "meeting exists: connector-added p95",
            _p95(repeat_added),
            "ms",
            "< 50",
            _p95(repeat_added) < 50,
        ),
        _at_most("meeting exists: table operations", ops_repeat, "count", 2),
        _figure(
            "meeting exists: Graph calls (createOrGet)",
            max(a + b for a, b in graph_repeat),
            "count",
            "== 1",
            set(graph_repeat) == {(1, 0)},
        ),
        _figure("cold first launch: connector-added", cold.added_ms, "ms", "-", True),
        _figure("cold first launch: outbound calls", sum(cold.calls.values()), "count", "-", True),
    ]


def browser_figures(
    first: _Launch,
    new_visits: list[_Launch],
    repeats: list[_Launch],
    patients: Sequence[_Launch] = (),
) -> list[dict[str, Any]]:
    """The ``browser: ...`` figures of launches driven through the host like a browser."""
    added = [run.added_ms for run in new_visits]
    repeat_added = [run.added_ms for run in repeats]
    ops_new = max(run.table_ops for run in new_visits)
    return [
        _figure(
            "browser: new visit connector-added p50", statistics.median(added), "ms", "-", True
        ),
        _at_most("browser: new visit connector-added p95", _p95(added), "ms", 15),
        _figure(
            "browser: new visit wall p50 (connector hops)",
            statistics.median(run.total_ms for run in new_visits),
            "ms",
            "-",
            True,
        ),
        _figure(
            "browser: new visit stand-ins' own time p50",
            statistics.median(run.stand_ins_ms for run in new_visits),
            "ms",
            "-",
            True,
        ),
        _figure(
            "browser: new visit storage time p50 (in added)",
            statistics.median(run.storage_ms for run in new_visits),
            "ms",
            "-",
            True,
        ),
        _at_most("browser: new visit table operations", ops_new, "count", 2),
        _figure(
            "browser: new visit queue messages",
            max(run.queue_messages for run in new_visits),
            "count",
            "-",
            True,
        ),
        _at_most("browser: meeting exists connector-added p95", _p95(repeat_added), "ms", 10),
        _figure("browser: first launch of a worker, added", first.added_ms, "ms", "-", True),
        *(_patient_figures(patients) if patients else []),
    ]


def _patient_figures(patients: Sequence[_Launch]) -> list[dict[str, Any]]:
    """The patient's launch into a meeting this worker has seen: state nonce and arrival."""
    added = [run.added_ms for run in patients]
    return [
        _figure(
            "browser: patient, meeting exists connector-added p50",
            statistics.median(added),
            "ms",
            "-",
            True,
        ),
        _at_most("browser: patient, meeting exists connector-added p95", _p95(added), "ms", 10),
        _at_most(
            "browser: patient, meeting exists table operations",
            max(run.table_ops for run in patients),
            "count",
            2,
        ),
    ]


def _raw(
    first: _Launch,
    new_visits: list[_Launch],
    repeats: list[_Launch],
    patients: list[_Launch],
) -> dict[str, Any]:
    def per(runs: list[_Launch]) -> dict[str, Any]:
        return {
            "added_ms": [round(r.added_ms, 2) for r in runs],
            "wall_ms": [round(r.total_ms, 2) for r in runs],
            "stand_ins_ms": [round(r.stand_ins_ms, 2) for r in runs],
            "storage_ms": [round(r.storage_ms, 2) for r in runs],
            "storage_sdk_cpu_ms": [round(r.storage_cpu_ms, 2) for r in runs],
            "outbound_client_ms": [round(r.outbound_ms, 2) for r in runs],
            "table_ops": sorted(Counter(r.table_ops for r in runs).items()),
            "queue_messages": sorted(Counter(r.queue_messages for r in runs).items()),
            "calls": dict(runs[0].calls),
            "stand_in_requests": runs[0].stand_in_requests,
        }

    return {
        "iterations": len(new_visits),
        "first": {
            "added_ms": round(first.added_ms, 2),
            "wall_ms": round(first.total_ms, 2),
            "stand_ins_ms": round(first.stand_ins_ms, 2),
            "storage_ms": round(first.storage_ms, 2),
            "storage_sdk_cpu_ms": round(first.storage_cpu_ms, 2),
            "outbound_client_ms": round(first.outbound_ms, 2),
            "table_ops": first.table_ops,
            "queue_messages": first.queue_messages,
            "calls": dict(first.calls),
            "stand_in_requests": first.stand_in_requests,
        },
        "new_visit": per(new_visits),
        "meeting_exists": per(repeats),
        "patient_meeting_exists": per(patients) if patients else {},
    }


# --- the bench ------------------------------------------------------------------------------


def run_launch_bench(quick: bool = False, iterations: int | None = None) -> dict[str, Any]:
    """Run the launch bench; returns ``{"figures": [...], ...raw}`` (prints nothing)."""
    from azure.storage.queue import QueueServiceClient  # noqa: F401  (fail early if missing)

    import function_app
    from connector_core.adapters.azure_storage import AzureMessageQueue, AzureTableStore
    from connector_core.bootstrap import Container, set_container
    from connector_core.domain.models import EhrUserMapping, utcnow
    from connector_core.domain.visit_keys import ehr_user_key
    from connector_core.settings import Settings
    from devtools._serve import free_port
    from devtools.host import LocalHost
    from devtools.seed_config import add_approved_config

    # 100 launches a scenario: a p95 of 40 was the third slowest, which any passing stall of the
    # machine decided alone.
    count = iterations or (10 if quick else 100)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        sandbox, env = connector_stack(stack, url)
        names = {
            sandbox.ehr_url: "ehr",
            sandbox.graph_url: "graph",
            sandbox.entra_url: "entra",
        }
        settings = Settings.from_environ(env)

        def worker(meter: _Meter) -> Container:
            """A fresh container (a new worker's caches), its storage and clients metered."""
            container = Container(
                settings=settings,
                store=_CountingStorage(  # type: ignore[arg-type]
                    AzureTableStore(settings.storage), meter, _TABLE_OPS, table=True
                ),
                queue=_CountingStorage(  # type: ignore[arg-type]
                    AzureMessageQueue(settings.storage),
                    meter,
                    frozenset({"send_message"}),
                    table=False,
                ),
                health_store=AzureTableStore(settings.storage),
            )
            _time_client(container.http, meter, names)
            _time_client(container.ehr_http, meter, names)
            set_container(container)
            return container

        browser_meter = _Meter(thread=None)
        in_process_meter = _Meter()
        container = worker(browser_meter)
        stack.callback(set_container, None)
        with _timed_host(sandbox.timing):
            host = LocalHost(function_app.app, port=port, run_triggers=False).start()
        stack.callback(host.stop)
        stack.enter_context(_patched_requests(browser_meter, names))
        stack.enter_context(_patched_requests(in_process_meter, names))
        appointments = stack.enter_context(_bench_appointments(2 * (count + 1)))

        now = utcnow()
        tenant = next(iter(sandbox.entra.tenants.values())).tid
        config = add_approved_config(
            container, tenant_id=tenant, fhir_base_url=sandbox.fhir_base, created_by="bench"
        )
        oid = sandbox.entra.user_for_practitioner(PRACTITIONER).oid
        container.mappings.upsert(
            EhrUserMapping(
                ehr_user_key=ehr_user_key(
                    container.keyring, sandbox.fhir_base, f"Practitioner/{PRACTITIONER}"
                ),
                region=settings.region,
                tenant_id=tenant,
                entra_oid=oid,
                entra_tid=tenant,
                created_at=now,
                last_used_at=now,
            )
        )

        def launch_url(appointment_id: str, user: str = "clinician") -> str:
            return sandbox.ehr.launch_url(
                config.id,
                appointment_id=appointment_id,
                user="patient" if user == "patient" else "clinician",
            )

        def scenario(
            launch: Callable[[str], _Launch],
            ids: list[str],
            patient: Callable[[str], _Launch] | None = None,
        ) -> tuple[_Launch, list[_Launch], list[_Launch], list[_Launch]]:
            first = launch(ids[0])  # a new worker's first launch: every cache cold
            new_visits: list[_Launch] = []
            repeats: list[_Launch] = []
            patients: list[_Launch] = []
            for appointment_id in ids[1:]:
                new_visits.append(launch(appointment_id))
                repeats.append(launch(appointment_id))
                if patient is not None:
                    patients.append(patient(appointment_id))
            return first, new_visits, repeats, patients

        # The bench's own objects (sandbox, seeds, clients, this harness) are no worker's: frozen
        # with what is loaded so far, as function_app.py freezes what indexing loaded, so the
        # collector's full passes during the launches scan what a worker's would.
        gc.freeze()
        stack.callback(gc.unfreeze)

        # Like a browser, through the host; first, so its first launch pays first imports too.
        browser = _Browser()
        stack.callback(browser.close)
        patient_browser = _Browser()  # the patient's own (MyChart's) browser
        stack.callback(patient_browser.close)
        b_first, b_new, b_repeat, b_patients = scenario(
            lambda appointment_id: _browser_launch(
                browser=browser,
                clock=sandbox.timing,
                meter=browser_meter,
                launch_url=launch_url(appointment_id),
                landings=(sandbox.graph_url, f"{url}/api/visits/"),
            ),
            appointments[: count + 1],
            patient=lambda appointment_id: _browser_launch(
                browser=patient_browser,
                clock=sandbox.timing,
                meter=browser_meter,
                launch_url=launch_url(appointment_id, "patient"),
                landings=(sandbox.graph_url,),  # the meeting's guest join link
            ),
        )

        # In-process, on another fresh worker (caches cold again; modules already imported).
        worker(in_process_meter)
        hop = stack.enter_context(httpx.Client(follow_redirects=False, timeout=30))
        api = f"{url}/api"
        cold, new_visits, repeats, _ = scenario(
            lambda appointment_id: _one_launch(
                meter=in_process_meter,
                api=api,
                launch_url=launch_url(appointment_id),
                config_id=config.id,
                browser=hop,
            ),
            appointments[count + 1 :],
        )

    figures = _in_process_figures(cold, new_visits, repeats) + browser_figures(
        b_first, b_new, b_repeat, b_patients
    )
    return {
        "figures": figures,
        "launches": {
            "iterations": len(new_visits),
            "cold": {
                "calls": dict(cold.calls),
                "table_ops": cold.table_ops,
                "queue_messages": cold.queue_messages,
            },
            "new_visit_calls": dict(new_visits[0].calls),
            "repeat_calls": dict(repeats[0].calls),
        },
        "browser": _raw(b_first, b_new, b_repeat, b_patients),
    }
