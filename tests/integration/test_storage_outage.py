"""Azurite restarted under a running connector: requests (health, a launch page, a Graph
notification) fail cleanly (503), then recover without restarting the connector. The connector runs as its own process (python -m devtools.host)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools._serve import free_port
from devtools.azurite import Azurite
from tests.helpers import make_environ

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_azurite() -> Iterator[Azurite]:
    with Azurite() as instance:
        yield instance


def _wait_for(url: str, status: int, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=5)
            if last.status_code == status:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status} (last: {last and last.status_code})")


def test_storage_outage_is_a_clean_503_then_recovers(own_azurite: Azurite, tmp_path: Path) -> None:
    port = free_port()
    settings_file = tmp_path / "local.settings.json"
    settings_file.write_text('{"IsEncrypted": false, "Values": {}}')
    env = {
        **os.environ,
        **make_environ(
            CONNECTOR_STORAGE=own_azurite.connection_string,
            CONNECTOR_PUBLIC_URL=f"http://127.0.0.1:{port}",
        ),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.host",
            "--port",
            str(port),
            "--settings",
            str(settings_file),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/api/health"
    launch = f"http://127.0.0.1:{port}/api/launch/provider/{'c' * 32}?iss=https://ehr.example/fhir&launch=x"
    presence = f"http://127.0.0.1:{port}/api/presence"
    notification = {"value": [{"subscriptionId": "sub-unknown", "clientState": "x"}]}
    try:
        assert _wait_for(url, 200).json()["status"] == "ok"
        own_azurite.stop()
        started = time.monotonic()
        down = httpx.get(url, timeout=30)
        assert down.status_code == 503
        assert down.headers["content-type"].startswith("application/problem+json")
        assert down.json()["correlationId"]
        assert "Traceback" not in down.text
        assert time.monotonic() - started < 10  # fails fast, no hanging retries
        # a launch (browser page) and a Graph notification (problem+json, Graph retries)
        started = time.monotonic()
        page = httpx.get(launch, timeout=30)
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
        assert "correlation id" in page.text and "Traceback" not in page.text
        webhook = httpx.post(presence, json=notification, timeout=30)
        assert webhook.status_code == 503
        assert webhook.headers["content-type"].startswith("application/problem+json")
        assert time.monotonic() - started < 20  # bounded storage retries
        own_azurite.start()  # same ports, same connection string
        assert _wait_for(url, 200).json()["region"] == "americas"
        # the same requests reach storage again, without restarting the connector (Azurite
        # lost its data: the tables are recreated on first use)
        assert _wait_for(launch, 404).headers["content-type"].startswith("text/html")
        accepted = httpx.post(presence, json=notification, timeout=30)
        assert accepted.status_code == 202 and accepted.headers["x-dropped"] == "1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode is not None
