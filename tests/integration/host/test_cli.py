"""``python -m devtools.host`` end to end: settings loading, serving, access log, graceful stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_cli_serves_app_with_settings_and_stops_gracefully(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "IsEncrypted": False,
                "Values": {"HOSTTEST_GREETING": "from-file", "HOSTTEST_OVERRIDE": "from-file"},
            }
        )
    )
    env = {**os.environ, "HOSTTEST_OVERRIDE": "from-env", "PYTHONUNBUFFERED": "1"}
    env.pop("HOSTTEST_GREETING", None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "devtools.host",
            "--port", "0",
            "--settings", str(settings),
            "--app", "tests.integration.host.fixture_app:app",
            "--no-triggers",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            found = re.search(r"Host started: (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
        assert url, "host did not start"
        resp = httpx.get(f"{url}/api/setting", params={"code": "oauth-code-xyz"})
        assert resp.json() == {"HOSTTEST_GREETING": "from-file", "HOSTTEST_OVERRIDE": "from-env"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "GET /api/setting 200" in stderr
    assert "oauth-code-xyz" not in stderr
