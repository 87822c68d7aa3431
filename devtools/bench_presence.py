"""Presence benchmark for ``make bench``: the webhook's acknowledgements under bounded bursts,
and how soon every write-back reaches the EHR. Loopback only; prints nothing itself.

Setup: Azurite (tables on an Azurite of their own), the sandbox EHR in its own process, the
connector's webhook on the local host in this process, and the queue worker in other host
processes, exactly as ``make run`` wires them. Visits are written straight through the
repositories (config, visit with sealed context, subscription with its clientState). The queue
Azurite starts afresh for each scenario: every 60 s it sweeps its queue storage, and with a few
thousand messages behind it that sweep stops its one thread for 8 to 13 s, for every client
(a probe apart from the connector sees the same stall); Azure Storage has no such pause.

A separate process plays Graph: it POSTs pre-encrypted rich notifications (one item per
request, as Graph sends meeting call events) at a fixed rate, open loop, over keep-alive
connections with a bounded number in flight. Every notification is a roster update with one
join or one leave, so each asks for exactly one AuditEvent. Three scenarios, one after another,
each drained before the next:

* ``burst``: 6000 notifications over 30 s across 200 visits (200/s, at most 64 in flight);
* ``group``: one meeting, 500 guests joining and leaving one after another: 1000 notifications
  over 5 s (200/s, at most 32 in flight);
* ``peak``: 500 notifications/s for 10 s across 200 visits (at most 128 in flight).

Measured for each, with its budget: acknowledgement p50/p99/max and non-202 answers; the delay
from the 202 to the AuditEvent at the sandbox EHR (p50, p99) and how long after the burst's end
the last one arrived; lost, duplicated and poisoned write-backs (counted at the EHR by the
write-back identifier each AuditEvent carries, and in the poison queue); and the table
operations (round trips, and entities written) and EHR calls the worker made per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["BenchVisit", "create_visits", "roster_notifications", "run_presence_bench"]

ACK_P99_BUDGET_MS = 100.0  # at 200 notifications/s
PEAK_ACK_P99_BUDGET_MS = 300.0  # at 500 notifications/s
GRAPH_DEADLINE_MS = 3000.0
DELAY_P99_BUDGET_S = 30.0
LAST_AFTER_END_BUDGET_S = 60.0
APPOINTMENT = "appt-6b1e0d34"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- the load process (plays Graph) ------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status


async def _send_all(
    url: str, bodies: list[bytes], rate: float, concurrency: int
) -> list[tuple[int, float, float, float]]:
    """Open-loop load: body ``i`` is due at ``start + i / rate``; at most ``concurrency`` in
    flight over keep-alive connections. A minimal HTTP/1.1 client on asyncio streams, so the
    load generator's own CPU cost stays far below the connector's: about 0.25 ms of CPU per
    request, where an httpx AsyncClient took 2 to 5.5 ms and offered only 100-170/s on this
    2-core machine, measuring itself (re-checked with and without the local servers' 40 ms
    Nagle stall fix: the same; the webhook's 202 has no body, so it was never stalled)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    results: list[tuple[int, float, float, float]] = [(0, 0.0, 0.0, 0.0)] * len(bodies)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    due: asyncio.Queue[int | None] = asyncio.Queue()

    async def schedule() -> None:
        for index in range(len(bodies)):
            await asyncio.sleep(max(0.0, start + index / rate - loop.time()))
            due.put_nowait(index)
        for _ in range(concurrency):
            due.put_nowait(None)

    async def connection() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while (index := await due.get()) is not None:
            late = loop.time() - (start + index / rate)
            body = bodies[index]
            sent = time.perf_counter()
            status = 0
            for _attempt in range(2):  # one reconnect if the server closed a kept-alive socket
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    assert reader is not None
                    writer.write(head.format(length=len(body)).encode() + body)
                    await writer.drain()
                    status = await _read_response(reader)
                    break
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
            results[index] = (
                status,
                (time.perf_counter() - sent) * 1000,
                time.time(),
                max(0.0, late) * 1000,
            )
        if writer is not None:
            writer.close()

    await asyncio.gather(schedule(), *(connection() for _ in range(concurrency)))
    return results


def _load_process(url: str, bodies_path: str, rate: float, concurrency: int, out: str) -> None:
    bodies = [line.encode() for line in Path(bodies_path).read_text().splitlines()]
    results = asyncio.run(_send_all(url, bodies, rate, concurrency))
    Path(out).write_text(json.dumps(results))


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float
    seconds: float
    visits: int  # 1: one meeting whose guests all differ
    concurrency: int
    ack_p99_budget_ms: float
    delay_budgets: bool = True


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("burst", 200.0, 5.0, 40, 64, ACK_P99_BUDGET_MS),
            Scenario("group", 200.0, 2.0, 1, 32, ACK_P99_BUDGET_MS),
            Scenario("peak", 500.0, 2.0, 40, 128, PEAK_ACK_P99_BUDGET_MS),
        ]
    return [
        Scenario("burst", 200.0, 30.0, 200, 64, ACK_P99_BUDGET_MS),
        Scenario("group", 200.0, 5.0, 1, 32, ACK_P99_BUDGET_MS),
        Scenario("peak", 500.0, 10.0, 200, 128, PEAK_ACK_P99_BUDGET_MS),
    ]


# --- visits and notifications (also used by tests/e2e/presence/test_presence_scale.py) ----------


@dataclass(frozen=True)
class BenchVisit:
    visit_key: str
    subscription_id: str
    secret: str
    tenant: str
    organizer: str
    staff: str


def create_visits(
    container: Any,
    *,
    tenant: str,
    organizer: str,
    staff: str,
    fhir_base: str,
    graph_url: str,
    count: int,
    config: Any = None,
) -> tuple[Any, list[BenchVisit]]:
    """An approved config (unless given) and ``count`` visits with subscriptions, written
    straight through the repositories; returns the config and the visits."""
    from connector_core.domain.models import GraphSubscription, Visit, utcnow
    from devtools.sandbox import seed
    from devtools.seed_config import add_approved_config

    now = utcnow()
    if config is None:
        config = add_approved_config(
            container, tenant_id=tenant, fhir_base_url=fhir_base, created_by="bench"
        )
    appt = seed.APPOINTMENTS[APPOINTMENT]
    sealed = container.keyring.seal(
        "visit-context",
        {
            "fhir_base_url": fhir_base,
            "practitioner": f"Practitioner/{appt.practitioner_id}",
            "patient": f"Patient/{appt.patient_id}",
            "appointment": f"Appointment/{appt.id}",
            "encounter": f"Encounter/{appt.encounter_id}",
            "conference_id": None,
        },
    )
    visits = []
    for _ in range(count):
        name = uuid.uuid4().hex
        visit_key = container.keyring.keyed_hash("visit", config.id, "bench", name)
        subscription_id = str(uuid.uuid4())
        secret = uuid.uuid4().hex + uuid.uuid4().hex
        container.visits.create(
            Visit(
                visit_key=visit_key,
                region=config.region,
                config_id=config.id,
                tenant_id=tenant,
                meeting_id=f"bench-{name}",
                join_web_url=f"{graph_url}/l/meetup-join/bench-{name}/0",
                organizer_oid=organizer,
                subscription_id=subscription_id,
                subscription_expires_at=now + timedelta(days=2),
                sealed_context=sealed,
                created_at=now,
                updated_at=now,
            )
        )
        container.subscriptions.upsert(
            GraphSubscription(
                subscription_id=subscription_id,
                region=config.region,
                visit_key=visit_key,
                tenant_id=tenant,
                client_state_sealed=container.keyring.seal("client-state", {"clientState": secret}),
                expires_at=now + timedelta(days=2),
                created_at=now,
            )
        )
        visits.append(BenchVisit(visit_key, subscription_id, secret, tenant, organizer, staff))
    return config, visits


def _graph_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def roster_notifications(
    container: Any, visits: list[BenchVisit], count: int, *, base: datetime | None = None
) -> tuple[list[str], list[str]]:
    """``count`` encrypted notification bodies (one roster update each: one join or one leave)
    and the write-back key each one asks for. Several visits: each visit's people (clinician,
    patient, staff in turn) join and leave, visits interleaved. One visit: a long group visit,
    every person a different guest, each joining and then leaving, one after another."""
    from cryptography import x509

    from connector_core.domain.models import ParticipantRole
    from connector_core.domain.presence import Transition, TransitionKind, writeback_key
    from devtools.sandbox._notify import encrypt_rich_notification

    pem = container.settings.graph_notification_cert.get_secret_value()
    cert = x509.load_pem_x509_certificate(pem.encode())
    base = base or datetime.now(UTC).replace(microsecond=0)
    run = uuid.uuid4().hex[:8]
    bodies, keys = [], []
    for index in range(count):
        if len(visits) == 1:
            visit = visits[0]
            person, joined = index // 2, index % 2 == 0  # join g0, leave g0, join g1, ...
            pid = f"guest-{run}-{person}"
            identity: dict[str, Any] = {"Guest": {"Id": pid, "DisplayName": "G"}}
            role = ParticipantRole.PATIENT
            at = base + timedelta(milliseconds=10 * index)
        else:
            visit = visits[index % len(visits)]
            step = index // len(visits)
            person = step // 2
            pid = f"bench-{run}-{index % len(visits)}-{person}"
            kind = person % 3
            if kind == 0:
                identity = {"User": {"Id": visit.organizer, "DisplayName": "D"}}
                role = ParticipantRole.CLINICIAN
            elif kind == 1:
                identity = {"Guest": {"Id": pid, "DisplayName": "G"}}
                role = ParticipantRole.PATIENT
            else:
                identity = {"User": {"Id": visit.staff, "DisplayName": "S"}}
                role = ParticipantRole.STAFF
            joined = step % 2 == 0
            at = base + timedelta(seconds=step)
        entry = {"Id": pid, "Identity": identity}
        event = {
            "@odata.type": "#Microsoft.Graph.onlineMeeting",
            "id": "communications/onlineMeetings?$filter=joinWebUrl+eq+'bench'",
            "eventType": "Microsoft.Communication.CallRosterUpdate",
            "eventDateTime": _graph_time(at),
            "activeParticipants@joined": [entry] if joined else [],
            "activeParticipants@exited": [] if joined else [entry],
        }
        item = {
            "subscriptionId": visit.subscription_id,
            "clientState": visit.secret,
            "changeType": "updated",
            "tenantId": visit.tenant,
            "resource": event["id"],
            "resourceData": {"id": event["id"], "@odata.type": "#microsoft.graph.onlineMeeting"},
            "encryptedContent": encrypt_rich_notification(event, cert, "bench"),
        }
        bodies.append(json.dumps({"value": [item]}))
        participant_key = container.keyring.keyed_hash("participant", visit.visit_key, pid)
        keys.append(
            writeback_key(
                visit.visit_key,
                Transition(
                    participant_key=participant_key,
                    role=role,
                    kind=TransitionKind.CONNECT if joined else TransitionKind.DISCONNECT,
                    at=at,
                ),
            )
        )
    return bodies, keys


# --- the other processes: the sandbox EHR, the queue worker --------------------------------------


class _TimedList(list[dict[str, Any]]):
    """Replaces the sandbox EHR's ``audit_events`` list: notes when each one arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[str | None, float]] = []

    def append(self, item: dict[str, Any]) -> None:
        key = None
        for entity in item.get("entity", []):
            identifier = entity.get("what", {}).get("identifier", {})
            if identifier.get("system") == "urn:ehr-virtual-visit:writeback":
                key = identifier.get("value")
        self.arrivals.append((key, time.time()))
        super().append(item)


def _lower_priority(pid: int | None) -> None:
    """Write-back runs on separate instances in Azure (queue worker, its table traffic); on
    this one 2-core machine their processes run at lower CPU priority instead, so the webhook's
    acknowledgements are not measured queueing behind them for CPU. (The EHR keeps normal
    priority: a starved EHR answers after the connector's timeout, and a retried POST then
    writes a second AuditEvent, which is the EHR's slowness, not the connector's.)"""
    if pid is not None:
        os.setpriority(os.PRIO_PROCESS, pid, 10)


def _sandbox_process(connector_url: str) -> None:
    """Child process: the sandbox (the EHR counts arrivals). Protocol on stdin/stdout, one JSON
    line each: it prints its info; then ``arrivals`` prints new ``[key, time]`` pairs, ``stop``
    ends it."""
    from devtools.sandbox import Sandbox, seed

    logging.disable(logging.WARNING)
    with Sandbox(connector_url=connector_url) as sandbox:
        arrivals = _TimedList()
        sandbox.ehr.audit_events = arrivals
        tenant = next(iter(sandbox.entra.tenants.values()))
        organizer = sandbox.entra.user_for_practitioner(
            seed.APPOINTMENTS[APPOINTMENT].practitioner_id
        )
        staff = next(u.oid for u in sandbox.entra.users_in(tenant.tid) if u.oid != organizer.oid)
        info = {
            "settings": sandbox.connector_settings(),
            "fhir_base": sandbox.fhir_base,
            "graph_url": sandbox.graph_url,
            "tenant": tenant.tid,
            "organizer": organizer.oid,
            "staff": staff,
        }
        print(json.dumps(info), flush=True)
        sent = 0
        for line in sys.stdin:
            command = line.strip()
            if command == "arrivals":
                batch = list(arrivals.arrivals[sent:])
                sent += len(batch)
                print(json.dumps(batch), flush=True)
            elif command == "stop":
                break


class _Meter:
    """What the worker process does per event: table round trips and entities written, EHR
    calls by kind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


_SINGLE_WRITES = ("create_entity", "update_entity", "upsert_entity", "delete_entity")


def _instrument(container: Any, meter: _Meter) -> None:
    """Count the worker's table requests and entities written (at the store: a query per 14
    keys, a transaction as one request) and its EHR calls (at the guarded EHR client's
    transport, which keeps its address checks)."""
    import httpx

    from connector_core.adapters.azure_storage import _queries

    store = container.store

    def counted(name: str) -> None:
        original = getattr(store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "list_entities":
                queries = _queries(
                    kwargs["partition_key"],
                    kwargs.get("row_keys"),
                    kwargs.get("row_key_prefix"),
                    kwargs.get("where"),
                )
                meter.add("table_requests", len(queries))
            else:
                meter.add("table_requests")
            if name == "submit_transaction":
                meter.add("table_entities", len(args[1]))
            elif name in _SINGLE_WRITES:
                meter.add("table_entities")
            return original(*args, **kwargs)

        setattr(store, name, call)

    for name in ("get_entity", "list_entities", "submit_transaction", *_SINGLE_WRITES):
        counted(name)
    http = container.ehr_http
    inner = http._transport

    class Counting(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            path = request.url.path
            if path.endswith("/AuditEvent"):
                kind = "ehr_audit_post" if request.method == "POST" else "ehr_audit_search"
            elif path.endswith("/token"):
                kind = "ehr_token"
            else:
                kind = "ehr_other"
            meter.add(kind)
            meter.add("ehr_calls")
            response: httpx.Response = inner.handle_request(request)
            return response

        def close(self) -> None:
            inner.close()

    http._transport = Counting()


def _worker_process(stats_path: str) -> None:
    """Child process: a queue-worker host (the same registered functions), counting what it
    does into ``stats_path`` twice a second until SIGTERM."""
    import function_app
    from connector_core.bootstrap import get_container
    from devtools._serve import free_port
    from devtools.host import LocalHost

    logging.basicConfig(level=logging.WARNING)
    meter = _Meter()
    _instrument(get_container(), meter)
    host = LocalHost(function_app.app, port=free_port(), log_requests=False).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    target = Path(stats_path)
    try:
        while not stop.wait(0.5):
            temporary = target.with_suffix(".tmp")
            temporary.write_text(json.dumps(meter.snapshot()))
            temporary.replace(target)
    finally:
        host.stop()


# --- the run -------------------------------------------------------------------------------------


def _figure(name: str, value: float, unit: str, budget: str, ok: bool) -> dict[str, Any]:
    return {
        "section": "presence",
        "name": name,
        "value": round(value, 2) if not math.isnan(value) else value,
        "unit": unit,
        "budget": budget,
        "ok": bool(ok) and not math.isnan(value),
    }


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _warm_queues(connection_string: str, container: Any) -> None:
    """After the queue emulator restarted: the presence queue exists again and the webhook's
    pooled connections are fresh (a dead kept-alive socket would cost its first send a retry)."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.queue import QueueClient

    from connector_core.queues import PRESENCE_QUEUE

    with contextlib.suppress(ResourceExistsError):
        QueueClient.from_connection_string(connection_string, PRESENCE_QUEUE).create_queue()
    senders = [
        threading.Thread(target=container.queue.send_message, args=("bench-warm-up", "x"))
        for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    time.sleep(2.5)  # the worker's poller backs off to 2 s while the queue is away


def _poison_count(connection_string: str) -> int:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.queue import QueueClient

    from connector_core.queues import PRESENCE_POISON_QUEUE

    client = QueueClient.from_connection_string(connection_string, PRESENCE_POISON_QUEUE)
    try:
        return int(client.get_queue_properties().approximate_message_count or 0)
    except ResourceNotFoundError:
        return 0


@dataclass
class _Run:
    """What one scenario measured."""

    scenario: Scenario
    results: list[tuple[int, float, float, float]]
    keys: list[str]
    arrivals: list[tuple[str | None, float]]
    poisoned: int
    worker_counts: dict[str, int]
    queue_messages: int
    cpu: dict[str, dict[str, float]]  # CPU seconds per process, during the load and the drain

    def figures(self) -> list[dict[str, Any]]:
        s = self.scenario
        p = f"{s.name}: "
        results, keys = self.results, self.keys
        statuses = Counter(status for status, _, _, _ in results)
        ack_ms = [ms for _, ms, _, _ in results]
        late_ms = [late for _, _, _, late in results]
        acked_at = {keys[i]: results[i][2] for i in range(len(keys))}
        expected = set(keys)
        seen = Counter(k for k, _ in self.arrivals if k in expected)
        first: dict[str, float] = {}
        for key, at in self.arrivals:
            if key in expected:
                first.setdefault(key, at)
        delays = [first[k] - acked_at[k] for k in expected if k in first]
        lost = len(expected - set(first))
        duplicated = sum(n - 1 for n in seen.values() if n > 1)
        burst_end = max(r[2] for r in results)
        last_after_end = (max(first.values()) - burst_end) if first else float("nan")
        non_202 = len(results) - statuses.get(202, 0)
        offered = len(results) / max(
            1e-9, max(r[2] for r in results) - min(r[2] - r[1] / 1000 for r in results)
        )
        p99 = _percentile(ack_ms, 99)
        events = max(1, len(results))
        counts = self.worker_counts
        figures = [
            _figure(
                p + "notifications offered",
                float(len(results)),
                "count",
                f"{int(s.rate * s.seconds)}",
                len(results) == int(s.rate * s.seconds),
            ),
            _figure(
                p + "offered rate",
                offered,
                "1/s",
                f">= {s.rate * 0.95:.0f}",
                offered >= s.rate * 0.95,
            ),
            _figure(
                p + "load lateness p99",
                _percentile(late_ms, 99),
                "ms",
                "< 1000",
                _percentile(late_ms, 99) < 1000,
            ),
            _figure(
                p + "webhook ack p50",
                _percentile(ack_ms, 50),
                "ms",
                f"< {s.ack_p99_budget_ms:.0f}",
                _percentile(ack_ms, 50) < s.ack_p99_budget_ms,
            ),
            _figure(
                p + "webhook ack p99",
                p99,
                "ms",
                f"< {s.ack_p99_budget_ms:.0f}",
                p99 < s.ack_p99_budget_ms,
            ),
            _figure(
                p + "webhook ack max",
                max(ack_ms),
                "ms",
                f"< {GRAPH_DEADLINE_MS:.0f}",
                max(ack_ms) < GRAPH_DEADLINE_MS,
            ),
            _figure(p + "non-202 answers", float(non_202), "count", "0", non_202 == 0),
            _figure(
                p + "write-back delay p50",
                _percentile(delays, 50),
                "s",
                f"< {DELAY_P99_BUDGET_S:.0f}",
                _percentile(delays, 50) < DELAY_P99_BUDGET_S,
            ),
            _figure(
                p + "write-back delay p99",
                _percentile(delays, 99),
                "s",
                f"< {DELAY_P99_BUDGET_S:.0f}",
                _percentile(delays, 99) < DELAY_P99_BUDGET_S,
            ),
            _figure(
                p + "last AuditEvent after the burst",
                last_after_end,
                "s",
                f"< {LAST_AFTER_END_BUDGET_S:.0f}",
                last_after_end < LAST_AFTER_END_BUDGET_S,
            ),
            _figure(p + "write-backs lost", float(lost), "count", "0", lost == 0),
            _figure(p + "write-backs duplicated", float(duplicated), "count", "0", duplicated == 0),
            _figure(
                p + "messages poisoned", float(self.poisoned), "count", "0", self.poisoned == 0
            ),
            _figure(
                p + "table round trips per event",
                counts.get("table_requests", 0) / events,
                "count",
                "<= 4",
                counts.get("table_requests", 0) / events <= 4,
            ),
            _figure(
                p + "table entities written per event",
                counts.get("table_entities", 0) / events,
                "count",
                "<= 4",
                counts.get("table_entities", 0) / events <= 4,
            ),
            _figure(
                p + "EHR calls per event",
                counts.get("ehr_calls", 0) / events,
                "count",
                "<= 1.1",
                counts.get("ehr_calls", 0) / events <= 1.1,
            ),
        ]
        return figures

    def raw(self) -> dict[str, Any]:
        statuses = Counter(status for status, _, _, _ in self.results)
        return {
            "rate": self.scenario.rate,
            "seconds": self.scenario.seconds,
            "visits": self.scenario.visits,
            "concurrency": self.scenario.concurrency,
            "notifications": len(self.results),
            "statuses": dict(statuses),
            "worker": self.worker_counts,
            "queue_messages_written": self.queue_messages,
            "events_per_queue_message": len(self.results) / max(1, self.queue_messages),
            "cpu_seconds": self.cpu,
        }


def run_presence_bench(
    *,
    quick: bool = False,
    worker_instances: int = 1,
    drain_timeout: float = 240.0,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the scenarios; returns ``{"figures": [...], "raw": {...}}``."""
    import function_app
    from connector_core.bootstrap import get_container, reset_container
    from devtools._serve import free_port
    from devtools.azurite import Azurite
    from devtools.dev_secrets import dev_secret_settings
    from devtools.host import LocalHost

    repo = Path(__file__).resolve().parent.parent
    host_log = logging.getLogger("devtools.host")
    saved_level, saved_propagate = host_log.level, host_log.propagate
    quiet = logging.NullHandler()
    host_log.addHandler(quiet)
    host_log.setLevel(logging.WARNING)
    saved_env: dict[str, str | None] = {}
    runs: list[_Run] = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="vv-bench-") as tmp:
        # Azurite serves every storage service from one single-threaded Node process; Azure
        # Storage serves tables and queues from separate, scaled-out front ends. Give the table
        # service its own Azurite so the webhook's queue writes don't wait behind the worker's
        # table traffic in the emulator's one thread (the connection string has both endpoints).
        azurite = stack.enter_context(Azurite())
        azurite_tables = stack.enter_context(Azurite())
        _lower_priority(azurite_tables.pid)
        storage = azurite.connection_string.replace(
            f"TableEndpoint=http://127.0.0.1:{azurite.table_port}/",
            f"TableEndpoint=http://127.0.0.1:{azurite_tables.table_port}/",
        )
        assert storage != azurite.connection_string
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # The sandbox (the EHR) runs in its own process, as a real EHR would not share the
        # connector's CPU; it reports when each AuditEvent arrived.
        child = subprocess.Popen(
            [sys.executable, "-m", "devtools.bench_presence", "sandbox", url],
            cwd=repo,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(child.wait, 30)
        stack.callback(lambda: child.stdin and not child.stdin.closed and child.stdin.close())
        assert child.stdin is not None
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())

        def ask(command: str) -> Any:
            assert child.stdin is not None
            assert child.stdout is not None
            child.stdin.write(command + "\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())

        env = {
            "CONNECTOR_REGION": "americas",
            "CONNECTOR_PUBLIC_URL": url,
            "CONNECTOR_STORAGE": storage,
            "CONNECTOR_DEV_MODE": "1",
            **dev_secret_settings(),
            **info["settings"],
        }
        for key, value in env.items():
            saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        try:
            reset_container()
            # The webhook serves HTTP here; queue work runs in other host processes, as Azure
            # runs queue-triggered work on its own instances and scales them out on a backlog
            # (one Python process would make acknowledgements wait behind write-back CPU).
            host = LocalHost(
                function_app.app, port=port, log_requests=False, run_triggers=False
            ).start()
            stack.callback(host.stop)
            stats = [Path(tmp, f"worker-{n}.json") for n in range(worker_instances)]
            workers = [
                subprocess.Popen(
                    [sys.executable, "-m", "devtools.bench_presence", "worker", str(path)],
                    cwd=repo,
                    env=dict(os.environ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=lambda: os.nice(10),  # see _lower_priority
                )
                for path in stats
            ]
            for worker in workers:
                stack.callback(worker.wait, 30)
                stack.callback(worker.terminate)

            def worker_counts() -> Counter[str]:
                total: Counter[str] = Counter()
                for path in stats:
                    with contextlib.suppress(FileNotFoundError, ValueError):
                        total.update(json.loads(path.read_text()))
                return total

            container = get_container()
            config = None
            from connector_core.domain.scopes import BACKEND_SERVICES_SCOPES, scope_string
            from connector_core.service.presence import lookup_subscription

            wanted = [x for x in scenarios(quick) if not only or x.name in only]
            for scenario in wanted:
                config, visits = create_visits(
                    container,
                    tenant=info["tenant"],
                    organizer=info["organizer"],
                    staff=info["staff"],
                    fhir_base=info["fhir_base"],
                    graph_url=info["graph_url"],
                    count=scenario.visits,
                    config=config,
                )
                count = int(scenario.rate * scenario.seconds)
                bodies, keys = roster_notifications(container, visits, count)
                bodies_path = Path(tmp, f"{scenario.name}.jsonl")
                bodies_path.write_text("\n".join(bodies))
                out = Path(tmp, f"{scenario.name}.results.json")
                # Steady state, as a long-running app has it: each subscription's record cached
                # (the first notification of a subscription in a process reads it from
                # storage), SMART discovery and the backend token fetched.
                for visit in visits:
                    lookup_subscription(container, visit.subscription_id)
                container.ehr_writer.backend_token(
                    info["fhir_base"],
                    allowed_hosts=(),
                    client_id=container.settings.smart_client_id,
                    scope=scope_string(BACKEND_SERVICES_SCOPES),
                )
                # A fresh queue emulator for each scenario's load and drain: Azurite sweeps its
                # queue storage every 60 s (QueueGCManager), and once it holds a few thousand
                # messages, deleted ones included, the sweep stops its one thread for 8 to 13 s,
                # for every client (a probe apart from the connector sees the same stall). Azure
                # Storage has no such pause; a scenario's load and drain fit in one interval.
                azurite.restart()
                _warm_queues(storage, container)
                before = worker_counts()
                sends_before = container.presence.group_commit.sends
                pids = {
                    "webhook": os.getpid(),
                    "worker": workers[0].pid,
                    "ehr": child.pid,
                    "azurite queues": azurite.pid,
                    "azurite tables": azurite_tables.pid,
                }
                cpu_start = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                load = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "devtools.bench_presence",
                        "load",
                        f"{url}/api/presence",
                        str(bodies_path),
                        str(scenario.rate),
                        str(scenario.concurrency),
                        str(out),
                    ],
                    cwd=repo,
                )
                _, status, usage = os.wait4(load.pid, 0)
                load.returncode = os.waitstatus_to_exitcode(status)
                assert load.returncode == 0, "the load generator failed"
                cpu_load = {name: _cpu_seconds(pid) - cpu_start[name] for name, pid in pids.items()}
                cpu_load["load generator"] = usage.ru_utime + usage.ru_stime
                cpu_mid = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                results: list[tuple[int, float, float, float]] = json.loads(out.read_text())
                expected = set(keys)
                arrivals: list[tuple[str | None, float]] = []
                arrived: set[str | None] = set()
                deadline = time.monotonic() + drain_timeout
                while time.monotonic() < deadline and not expected <= arrived:
                    time.sleep(0.5)
                    batch = [(k, t) for k, t in ask("arrivals")]
                    arrivals.extend(batch)
                    arrived.update(k for k, _ in batch)
                time.sleep(2.0)  # late duplicates would show up here
                arrivals.extend((k, t) for k, t in ask("arrivals"))
                time.sleep(1.0)  # the workers' counters are written twice a second
                cpu_drain = {name: _cpu_seconds(pid) - cpu_mid[name] for name, pid in pids.items()}
                counts = worker_counts()
                counts.subtract(before)
                runs.append(
                    _Run(
                        scenario=scenario,
                        results=results,
                        keys=keys,
                        arrivals=arrivals,
                        poisoned=_poison_count(storage),
                        worker_counts={k: v for k, v in counts.items() if v},
                        queue_messages=container.presence.group_commit.sends - sends_before,
                        cpu={
                            "load": {k: round(v, 2) for k, v in cpu_load.items()},
                            "drain": {k: round(v, 2) for k, v in cpu_drain.items()},
                        },
                    )
                )
            exits = [w.poll() for w in workers]
            assert exits == [None] * len(workers), f"a queue worker process exited early: {exits}"
            child.stdin.write("stop\n")
            child.stdin.flush()
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            reset_container()
            host_log.removeHandler(quiet)
            host_log.setLevel(saved_level)
            host_log.propagate = saved_propagate
    return {
        "figures": [f for run in runs for f in run.figures()],
        "raw": {
            "worker_instances": worker_instances,
            **{run.scenario.name: run.raw() for run in runs},
        },
    }


if __name__ == "__main__":  # the child processes of the benchmark
    if sys.argv[1] == "load":  # URL BODIES RATE CONCURRENCY OUT
        _load_process(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif sys.argv[1] == "sandbox":  # CONNECTOR_URL
        _sandbox_process(sys.argv[2])
    elif sys.argv[1] == "worker":  # STATS_PATH
        _worker_process(sys.argv[2])
