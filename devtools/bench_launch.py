"""The launch part of ``make bench``: what the connector adds to a clinician's launch.

Everything runs locally: Azurite (tables), the sandbox (EHR, Entra over HTTPS, Graph) and the
local Functions host (the Graph stand-in validates the presence webhook through it). The launch
functions are called in-process with real ``func.HttpRequest`` objects, the browser's hop to the
EHR's authorize endpoint is made in between (not counted), and:

* table operations are counted (and timed) by a wrapper around the connector's table store;
* outbound HTTP is counted and timed per host by a transport around the connector's httpx
  client, and msal's requests (Entra) by a wrapper around ``requests.Session.send``;
* connector-added time = the two function calls' wall time minus the time spent inside those
  table operations and outbound calls (the stand-ins' own time).

Scenario, per measured launch: a repeat clinician (mapped) launches a new visit on a warm worker
(discovery, JWKS, Graph token, config and mapping caches warm), then launches it again (the
meeting exists). Only the bench thread's table operations and calls are counted (the webhook
validation the Graph stand-in makes runs on the host's threads). ``run_launch_bench`` prints
nothing; ``devtools/bench.py`` prints its figures.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

__all__ = ["run_launch_bench"]

PRACTITIONER = "prac-7f3a91c2"
PATIENT = "pat-3c9e1f40"


@dataclass
class _Meter:
    """Counts and times, for the bench thread only, while armed."""

    thread: int = field(default_factory=threading.get_ident)
    armed: bool = False
    table_ops: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    inside_s: float = 0.0

    def reset(self) -> None:
        self.table_ops = 0
        self.calls = Counter()
        self.inside_s = 0.0

    def mine(self) -> bool:
        return self.armed and threading.get_ident() == self.thread


class _CountingStore:
    """EntityStore wrapper: counts and times every operation (the same ops as billing)."""

    def __init__(self, inner: Any, meter: _Meter) -> None:
        self._inner = inner
        self._meter = meter

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name not in {
            "get_entity",
            "create_entity",
            "update_entity",
            "upsert_entity",
            "delete_entity",
            "list_entities",
            "submit_transaction",
        }:
            return target

        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self._meter.mine():
                return target(*args, **kwargs)
            started = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                self._meter.inside_s += time.perf_counter() - started
                self._meter.table_ops += 1

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
        self._meter.inside_s += time.perf_counter() - started
        self._meter.calls[_classify(self._names, request.url)] += 1
        return response

    def close(self) -> None:
        self._inner.close()


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
        kind = _classify(names, str(request.url))
        if not meter.mine() or kind.startswith("other"):
            # the Azure SDK speaks requests too: tables are timed by the store wrapper
            return original(self, request, **kwargs)
        started = time.perf_counter()
        try:
            return original(self, request, **kwargs)
        finally:
            meter.inside_s += time.perf_counter() - started
            meter.calls[kind] += 1

    requests.Session.send = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        requests.Session.send = original  # type: ignore[method-assign]


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
    total_ms: float
    added_ms: float
    table_ops: int
    calls: Counter[str]


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
    )


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


def run_launch_bench(quick: bool = False, iterations: int | None = None) -> dict[str, Any]:
    """Run the launch bench; returns ``{"figures": [...], "launches": {...}}`` (prints nothing)."""
    from azure.storage.queue import QueueServiceClient  # noqa: F401  (fail early if missing)

    import function_app
    from connector_core.adapters.azure_storage import AzureMessageQueue, AzureTableStore
    from connector_core.bootstrap import Container, set_container
    from connector_core.domain.models import (
        EhrUserMapping,
        utcnow,
    )
    from connector_core.domain.visit_keys import ehr_user_key
    from connector_core.settings import Settings
    from devtools._serve import free_port
    from devtools.azurite import Azurite
    from devtools.dev_secrets import dev_secret_settings
    from devtools.host import LocalHost
    from devtools.sandbox import Sandbox
    from devtools.seed_config import add_approved_config

    count = iterations or (10 if quick else 40)
    meter = _Meter()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
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
        }
        stack.enter_context(_environ(env))
        names = {
            sandbox.ehr_url: "ehr",
            sandbox.graph_url: "graph",
            sandbox.entra_url: "entra",
        }
        settings = Settings.from_environ(env)
        container = Container(
            settings=settings,
            store=_CountingStore(AzureTableStore(settings.storage), meter),  # type: ignore[arg-type]
            queue=AzureMessageQueue(settings.storage),
            health_store=AzureTableStore(settings.storage),
        )
        base_http = container.http
        container.http = httpx.Client(
            transport=_TimingTransport(httpx.HTTPTransport(), meter, names),
            timeout=base_http.timeout,
            follow_redirects=False,
            headers=base_http.headers,
        )
        set_container(container)
        stack.callback(set_container, None)
        host = LocalHost(function_app.app, port=port, run_triggers=False).start()
        stack.callback(host.stop)
        stack.enter_context(_patched_requests(meter, names))
        appointments = stack.enter_context(_bench_appointments(count + 1))

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
        browser = stack.enter_context(httpx.Client(follow_redirects=False, timeout=30))
        api = f"{url}/api"

        def launch(appointment_id: str) -> _Launch:
            launch_url = sandbox.ehr.launch_url(
                config.id, appointment_id=appointment_id, user="clinician"
            )
            return _one_launch(
                meter=meter, api=api, launch_url=launch_url, config_id=config.id, browser=browser
            )

        cold = launch(appointments[0])  # fills discovery, JWKS, msal and in-process caches
        new_visits: list[_Launch] = []
        repeats: list[_Launch] = []
        for appointment_id in appointments[1:]:
            new_visits.append(launch(appointment_id))
            repeats.append(launch(appointment_id))

    def calls(launches: list[_Launch], kind: str) -> int:
        return max(run.calls[kind] for run in launches)

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
    figures = [
        _figure("new visit: connector-added p50", statistics.median(added), "ms", "-", True),
        _figure("new visit: connector-added p95", _p95(added), "ms", "< 50", _p95(added) < 50),
        _figure(
            "new visit: total p50 (incl. stand-ins)", statistics.median(total), "ms", "-", True
        ),
        _figure("new visit: table operations", ops_new, "count", "<= 4", ops_new <= 4),
        _figure(
            "new visit: EHR calls (token exchange)",
            max(ehr_new) + ehr_other,
            "count",
            "== 1",
            set(ehr_new) == {1} and ehr_other == 0,
        ),
        _figure(
            "new visit: Graph createOrGet + subscription",
            max(a + b for a, b in graph_new),
            "count",
            "== 1 + 1",
            set(graph_new) == {(1, 1)},
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
        _figure("meeting exists: table operations", ops_repeat, "count", "<= 4", ops_repeat <= 4),
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
    return {
        "figures": figures,
        "launches": {
            "iterations": len(new_visits),
            "cold": {"calls": dict(cold.calls), "table_ops": cold.table_ops},
            "new_visit_calls": dict(new_visits[0].calls),
            "repeat_calls": dict(repeats[0].calls),
        },
    }
