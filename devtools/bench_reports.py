"""``make bench`` section ``reports``: a report of 10,000 visits through the local host.

Seeds 10,000 visit summaries of one tenant over 31 days in Azurite (and a few of another
tenant, which the report must not read), then times ``GET /api/reports/visits`` over real HTTP
with an auditor's token from the Entra stand-in: JSON and CSV, several runs each (median and
max). Budget: under 2000 ms. The figure counts the whole answer, query and transfer included.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

VISITS = 10_000
DAYS = 31
BUDGET_MS = 2000.0


def synthetic_summaries(
    tenant_id: str,
    *,
    count: int,
    last_day: date,
    days: int,
    config_id: str,
    organizers: tuple[str, ...] = (),
    seed: int = 7,
) -> list[Any]:
    """``count`` synthetic summaries spread over ``days`` days ending ``last_day`` (also used
    by ``devtools.run --seed-reports``): departments ``SYNTHETIC-...``, one in eight a no-show."""
    import random

    from connector_core.domain.models import Environment, Region
    from connector_core.domain.reports import ReportStatus, VisitSummary

    rng = random.Random(seed)
    rows = []
    for n in range(count):
        day = last_day - timedelta(days=n % days)
        start = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(
            hours=8 + rng.randrange(10), minutes=rng.randrange(60)
        )
        no_show = rng.random() < 0.125
        duration = rng.randrange(300, 2400)
        rows.append(
            VisitSummary(
                visit_key=f"5e{n:030x}",
                region=Region.AMERICAS,
                tenant_id=tenant_id,
                config_id=config_id,
                day=day,
                environment=Environment.PRODUCTION,
                department_id=f"SYNTHETIC-{n % 5 + 1}",
                started_at=None if no_show else start,
                ended_at=start + timedelta(seconds=duration),
                duration_seconds=None if no_show else duration,
                lobby_wait_seconds=None if no_show else int(rng.expovariate(1 / 240)),
                attendants=1 if no_show else 2 + (n % 11 == 0),
                staff_count=1 + (n % 11 == 0),
                guest_count=0 if no_show else 1,
                organizer_oid=organizers[n % len(organizers)] if organizers else None,
                status=ReportStatus.NO_SHOW if no_show else ReportStatus.COMPLETED,
                synthetic=True,
            )
        )
    return rows


def run_reports_bench(quick: bool = False) -> dict[str, Any]:
    """Run the reports bench; returns ``{"figures": [...], ...raw}`` (prints nothing)."""
    import httpx

    import function_app
    from connector_core.bootstrap import reset_container
    from devtools._serve import free_port
    from devtools.bench_launch import connector_stack
    from devtools.host import LocalHost
    from devtools.sandbox.entra import AUDITOR_ROLE

    runs = 3 if quick else 7
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        sandbox, _ = connector_stack(stack, url, ENTRA_API_AUDIENCE="")
        reset_container()
        stack.callback(reset_container)
        from connector_core.bootstrap import get_container

        container = get_container()
        tenants = list(sandbox.entra.tenants.values())
        tenant, other = tenants[0].tid, tenants[1].tid
        today = datetime.now(UTC).date()
        seeded_at = time.perf_counter()
        container.reports.put_many(
            synthetic_summaries(
                tenant, count=VISITS, last_day=today, days=DAYS, config_id="bench-config"
            )
        )
        container.reports.put_many(
            synthetic_summaries(other, count=200, last_day=today, days=DAYS, config_id="other")
        )
        seed_s = time.perf_counter() - seeded_at
        host = LocalHost(function_app.app, port=port, run_triggers=False).start()
        stack.callback(host.stop)
        token = sandbox.entra.mint_access_token(tid=tenant, roles=[AUDITOR_ROLE])
        params = {"from": (today - timedelta(days=DAYS - 1)).isoformat(), "to": today.isoformat()}
        timings: dict[str, list[float]] = {"json": [], "csv": []}
        sizes: dict[str, int] = {}
        rows: dict[str, int] = {}
        with httpx.Client(base_url=f"{url}/api", timeout=60) as client:
            headers = {"Authorization": f"Bearer {token}"}
            client.get("/reports/visits", params=params, headers=headers)  # warm the worker
            for _ in range(runs):
                for fmt in ("json", "csv"):
                    started = time.perf_counter()
                    response = client.get(
                        "/reports/visits", params={**params, "format": fmt}, headers=headers
                    )
                    timings[fmt].append((time.perf_counter() - started) * 1000)
                    response.raise_for_status()
                    sizes[fmt] = len(response.content)
                    rows[fmt] = (
                        len(response.json()["visits"])
                        if fmt == "json"
                        else response.text.count("\r\n") - 1
                    )
    figures = []
    for fmt in ("json", "csv"):
        p50, worst = statistics.median(timings[fmt]), max(timings[fmt])
        for name, value in ((f"10k visits {fmt} p50", p50), (f"10k visits {fmt} max", worst)):
            figures.append(
                {
                    "section": "reports",
                    "name": name,
                    "value": round(value, 1),
                    "unit": "ms",
                    "budget": f"< {BUDGET_MS:g}",
                    "ok": value < BUDGET_MS and rows[fmt] == VISITS,
                }
            )
    return {
        "figures": figures,
        "visits": VISITS,
        "days": DAYS,
        "runs": runs,
        "timings_ms": timings,
        "bytes": sizes,
        "rows": rows,
        "seed_s": round(seed_s, 2),
    }
