"""``make bench``: bounded, loopback-only benchmarks. Prints a table and writes bench-results.json.

Sections: cold start (always), launch and presence (when their bench modules are present).
Each figure has a budget; misses are marked and make the command exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# Third-party modules function_app needs at import (what any Functions app of ours pays anyway).
THIRD_PARTY_BASELINE = "import azure.functions, pydantic"
# Modules only some requests need; importing function_app must not pull them in.
HEAVY_MODULES = (
    "fhir.resources",
    "msal",
    "jwt",
    "cryptography.hazmat.primitives.ciphers.aead",
    "azure.identity",
)


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    budget: str
    ok: bool


def _measure_import(code: str, runs: int) -> tuple[float, float]:
    """Median wall time (ms) and median peak RSS (MiB) of a fresh interpreter running ``code``."""
    script = (
        "import time, resource; t=time.perf_counter(); "
        f"{code}; "
        "dt=(time.perf_counter()-t)*1000; "
        "print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    times, rss = [], []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        times.append(float(out[0]))
        rss.append(float(out[1]))
    return statistics.median(times), statistics.median(rss)


def cold_start(runs: int = 7) -> list[Figure]:
    app_ms, app_rss = _measure_import("import function_app", runs)
    base_ms, base_rss = _measure_import(THIRD_PARTY_BASELINE, runs)
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, function_app; "
            f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return [
        Figure("cold start", "import function_app", round(app_ms, 1), "ms", "-", True),
        Figure("cold start", "import third-party deps only", round(base_ms, 1), "ms", "-", True),
        Figure(
            "cold start",
            "import time ratio",
            round(app_ms / base_ms, 2),
            "x",
            "<= 2.0",
            app_ms / base_ms <= 2.0,
        ),
        Figure("cold start", "peak RSS function_app", round(app_rss, 1), "MiB", "-", True),
        Figure(
            "cold start",
            "peak RSS ratio",
            round(app_rss / base_rss, 2),
            "x",
            "<= 1.5",
            app_rss / base_rss <= 1.5,
        ),
        Figure(
            "cold start",
            "heavy modules at import",
            float(len(heavy.split(",")) if heavy else 0),
            "count",
            "0",
            not heavy,
        ),
    ]


def _optional(module: str, function: str) -> Callable[..., dict[str, Any]] | None:
    try:
        return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results.json")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    figures = cold_start(runs=3 if args.quick else 7)
    for module, function in (
        ("devtools.bench_launch", "run_launch_bench"),
        ("devtools.bench_presence", "run_presence_bench"),
    ):
        bench = _optional(module, function)
        if bench is None:
            continue
        result = bench(quick=args.quick)
        for item in result.get("figures", []):
            figures.append(Figure(**item))
    width = max(len(f.name) for f in figures)
    print(f"{'section':<12} {'figure':<{width}} {'value':>10} {'unit':<6} {'budget':<12} ok")
    for f in figures:
        mark = "ok" if f.ok else "MISS"
        print(f"{f.section:<12} {f.name:<{width}} {f.value:>10} {f.unit:<6} {f.budget:<12} {mark}")
    args.out.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(f.ok for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
