"""``make bench`` itself: every figure ends up with a budget, misses are marked and fail the
command, and the cold-start section runs (quick) and writes its JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from devtools import bench


def _item(section: str, name: str, value: float, budget: str = "-", ok: bool = True) -> dict:
    return {
        "section": section,
        "name": name,
        "value": value,
        "unit": "ms",
        "budget": budget,
        "ok": ok,
    }


def test_informational_figures_get_their_budget_and_misses_are_marked() -> None:
    fast = bench.held_to_budget(_item("presence", "webhook ack p50", 12.0))
    slow = bench.held_to_budget(_item("presence", "webhook ack p50", 400.0))
    assert fast.budget == slow.budget == "< 100"
    assert fast.ok and not slow.ok
    # a section's own budget and verdict are kept
    own = bench.held_to_budget(_item("presence", "webhook ack p99", 900.0, "< 300", False))
    assert own.budget == "< 300" and not own.ok
    # a figure that could not be measured is a miss, whatever its budget
    assert not bench.held_to_budget(_item("presence", "write-back delay p99", math.nan)).ok
    table = bench.render([fast, slow, own])
    assert table.count("MISS") == 2 and "2 over budget" in table


def test_the_issue_headline_figures_all_have_budgets() -> None:
    for key in [
        ("launch", "new visit: connector-added p50"),
        ("presence", "webhook ack p50"),
        ("presence", "write-back delay p50"),
        ("presence", "write-back delay p99"),
    ]:
        assert key in bench.BUDGETS


def test_cold_start_section_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--only", "cold start", "--out", str(out)])
    document = json.loads(out.read_text())
    names = {f["name"]: f for f in document["figures"]}
    assert {"import time ratio", "peak RSS ratio", "heavy modules at import"} <= set(names)
    assert all(f["budget"] != "-" or f["name"].endswith("deps only") for f in document["figures"])
    assert names["heavy modules at import"]["value"] == 0 and names["heavy modules at import"]["ok"]
    assert document["machine"]["cpus"] and document["raw"]["cold start"]["imports"]["runs"] == 3
    # ratios may miss on a very busy machine: the exit code says so, the table marks it
    assert code == (0 if all(f["ok"] for f in document["figures"]) else 1)
