"""`import function_app` stays light: heavy modules load only on the requests that need them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtools.bench import HEAVY_MODULES

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_function_app_import_pulls_in_no_heavy_module() -> None:
    code = (
        "import sys, function_app; "
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == ""


def test_function_app_registers_every_area() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import function_app; "
            "print(' '.join(sorted(f.get_function_name() for f in function_app.app.get_functions())))",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    names = out.stdout.split()
    assert "health" in names
    assert "jwks" in names
