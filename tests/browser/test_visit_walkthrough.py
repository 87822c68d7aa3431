"""The visit as people live it, in headless Chromium, following the README's walkthrough ("Try it: a virtual visit in the sandbox"): the clinician
starts the visit from the sandbox EHR page and lands on the visit page; the patient's launch
shows there as waiting within 2 s, then connected once admitted in the meeting, then left; the
patient runs the device check with fake camera and microphone. Screenshots for the README."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector_core.domain.models import ProviderLanding, TenantConfig
from devtools.sandbox import seed
from devtools.seed_config import add_approved_config
from tests.chromium import chromium_available, headless_chromium
from tests.e2e.launch.helpers import drop_config, forget_mapping
from tests.stack import Stack

pytestmark = pytest.mark.browser

APPOINTMENT = "appt-93af2c6b"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
FAKE_MEDIA = (
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
)


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    container = fresh_stack.container()
    tid = fresh_stack.tenant(0).tid
    existing = container.configs.find_id_by_url(tid, "test", fresh_stack.sandbox.fhir_base)
    if existing:
        container.configs.delete(tid, existing)
    created = add_approved_config(
        container,
        tenant_id=tid,
        fhir_base_url=fresh_stack.sandbox.fhir_base,
        provider_landing=ProviderLanding.VISIT_PAGE,
    )
    yield created
    drop_config(fresh_stack, created)


def test_walkthrough_visit_page_and_device_check(fresh_stack: Stack, config: TenantConfig) -> None:
    assert chromium_available(), "run `make browser-deps` (Debian chromium + chromium-driver)"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    s = fresh_stack
    practitioner = seed.APPOINTMENTS[APPOINTMENT].practitioner_id
    forget_mapping(s, practitioner)
    upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
    ehr_page = f"{s.sandbox.ehr_url}/?config={config.id}"
    SHOTS.mkdir(parents=True, exist_ok=True)

    def button(role: str) -> str:
        return f'a.launch[data-role="{role}"][data-appointment="{APPOINTMENT}"]'

    with headless_chromium(extra_flags=FAKE_MEDIA) as driver:
        wait = WebDriverWait(driver, 30)
        quick = WebDriverWait(driver, 2.5, poll_frequency=0.1)  # "within 2 s" plus the poll

        # 1. The clinician starts the visit from the EHR and lands on the visit page.
        driver.get(ehr_page)
        driver.find_element(By.CSS_SELECTOR, button("clinician")).click()
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'a.account[data-upn="{upn}"]')))
        driver.find_element(By.CSS_SELECTOR, f'a.account[data-upn="{upn}"]').click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#visit[data-mode]")))
        assert "/api/visits/" in driver.current_url
        visit_tab = driver.current_window_handle
        summary = driver.find_element(By.ID, "summary")
        assert summary.get_attribute("data-waiting") == "false"
        join_url = driver.find_element(
            By.CSS_SELECTOR, 'a.open[data-open="browser"]'
        ).get_attribute("href")
        app_url = driver.find_element(By.CSS_SELECTOR, 'a.open[data-open="app"]').get_attribute(
            "href"
        )
        assert join_url and join_url.startswith(s.sandbox.graph_url)
        assert app_url and app_url.startswith("msteams:/l/meetup-join/")
        driver.save_screenshot(str(SHOTS / "walkthrough-6-visit-page.png"))
        # The subscription is made off the launch's path (docs/launch.md), and Graph sends no
        # event that happened before it existed; a person takes longer than the worker to reach
        # the meeting, a test on a busy machine need not.
        meeting = s.sandbox.graph.meeting_by_join_url(join_url)
        wait.until(lambda d: any(x.active for x in s.sandbox.graph.subscriptions_for(meeting.id)))

        # 2. The patient starts the visit (another tab) and waits in the meeting's lobby.
        driver.switch_to.new_window("tab")
        patient_tab = driver.current_window_handle
        driver.get(ehr_page)
        driver.find_element(By.CSS_SELECTOR, button("patient")).click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "form.join-guest")))
        driver.find_element(By.CSS_SELECTOR, "input.guest-name").send_keys("Guest")
        driver.find_element(By.CSS_SELECTOR, 'button.join[data-role="guest"]').click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '[data-state="lobby"]')))

        driver.switch_to.window(visit_tab)
        started = time.monotonic()
        quick.until(
            lambda d: d.find_element(By.ID, "summary").get_attribute("data-waiting") == "true"
        )
        waited = time.monotonic() - started
        assert driver.find_elements(By.CSS_SELECTOR, 'li[data-role="patient"][data-status="lobby"]')
        driver.save_screenshot(str(SHOTS / "walkthrough-7-patient-waiting.png"))

        # 3. The clinician opens the meeting and admits the patient: connected.
        driver.switch_to.new_window("tab")
        meeting_tab = driver.current_window_handle
        driver.get(join_url)
        driver.find_element(By.CSS_SELECTOR, 'button.join[data-role="organizer"]').click()
        wait.until(lambda d: _click(d, "button.admit"))
        driver.switch_to.window(visit_tab)
        connected = 'li[data-role="patient"][data-status="connected"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, connected))
        assert driver.find_element(By.ID, "summary").get_attribute("data-waiting") == "false"
        driver.save_screenshot(str(SHOTS / "walkthrough-8-connected.png"))

        # 4. The patient leaves: left.
        driver.switch_to.window(patient_tab)
        wait.until(lambda d: _click(d, "button.leave"))  # the meeting page refreshes itself
        driver.switch_to.window(visit_tab)
        left = 'li[data-role="patient"][data-status="left"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, left))
        driver.save_screenshot(str(SHOTS / "walkthrough-9-patient-left.png"))
        driver.switch_to.window(meeting_tab)
        driver.close()

        # 5. The patient's device check, with Chromium's fake camera and microphone.
        driver.switch_to.window(patient_tab)
        driver.get(f"{s.api}/device-test/{config.id}")
        driver.find_element(By.ID, "start").click()
        wait.until(
            lambda d: d.find_element(By.ID, "camera-result").get_attribute("data-state") == "ok"
        )
        wait.until(
            lambda d: d.find_element(By.ID, "mic-result").get_attribute("data-state") == "ok"
        )
        driver.find_element(By.ID, "tone").click()
        driver.find_element(By.ID, "heard-yes").click()
        assert driver.find_element(By.ID, "speaker-result").get_attribute("data-state") == "ok"
        driver.save_screenshot(str(SHOTS / "walkthrough-10-device-check.png"))

        # 6. The sandbox EHR page shows the write-backs: the patient's and the clinician's
        # connect and disconnect, as AuditEvents, under the appointment (the page polls).
        driver.get(ehr_page)
        writebacks = (
            f'ul.writebacks[data-profile="default"][data-appointment="{APPOINTMENT}"] '
            'li[data-kind="auditevent"]'
        )

        def audit_lines(d: object) -> list[str]:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, writebacks)]

        # Write-backs are at least once, not in order: a raced or retried one lands later.
        for expected in ("clinician connected", "patient connected", "patient disconnected"):
            wait.until(
                lambda d, expected=expected: any(expected in line for line in audit_lines(d)),
                f"no {expected!r} write-back on the EHR page: {audit_lines(driver)}",
            )
        driver.save_screenshot(str(SHOTS / "walkthrough-11-ehr-writebacks.png"))
    assert waited < 2.5


def _click(driver: object, selector: str) -> bool:
    """Click ``selector`` once it is there; False (try again) while the page is reloading."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By

    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()  # type: ignore[attr-defined]
    except (
        NoSuchElementException,
        StaleElementReferenceException,
        ElementClickInterceptedException,
    ):
        return False
    return True
