"""The sandbox EHR page as a person sees it, in headless Chromium: appointments and launch buttons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devtools.sandbox import seed
from tests.chromium import chromium_available, headless_chromium
from tests.stack import Stack

pytestmark = pytest.mark.browser


def test_sandbox_ehr_page_renders_launch_buttons(stack: Stack, tmp_path: Path) -> None:
    assert chromium_available(), "run `make browser-deps` (Debian chromium + chromium-driver)"
    from selenium.webdriver.common.by import By

    config = stack.create_approved_config()
    with headless_chromium() as driver:
        driver.get(f"{stack.sandbox.ehr_url}/?config={config.id}")
        assert (
            "appointments" in driver.title.lower() or "appointments" in driver.page_source.lower()
        )
        clinician = driver.find_elements(By.CSS_SELECTOR, "a.launch[data-role=clinician]")
        patient = driver.find_elements(By.CSS_SELECTOR, "a.launch[data-role=patient]")
        assert len(clinician) >= 4
        assert len(patient) == len(clinician)
        assert all(
            b.is_displayed()
            and f"/api/launch/provider/{config.id}?" in (b.get_attribute("href") or "")
            for b in clinician
        )
        assert all(
            f"/api/launch/patient/{config.id}?" in (b.get_attribute("href") or "") for b in patient
        )
        appointments = {b.get_attribute("data-appointment") for b in clinician}
        assert set(seed.GROUP_APPOINTMENT_IDS) <= appointments
        shot = Path(os.environ.get("VV_SCREENSHOT_DIR", str(tmp_path))) / "sandbox-ehr.png"
        assert driver.save_screenshot(str(shot))
        # a real rendering, not a blank page: a PNG of some size
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000
