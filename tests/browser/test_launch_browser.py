"""The demo as a person does it, in headless Chromium: on the sandbox EHR page, "Start virtual
visit" as the clinician (Microsoft sign-in the first time), then as the patient: both land on the
same Teams meeting page (the patient as a browser guest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from tests.chromium import chromium_available, headless_chromium
from tests.e2e.launch.helpers import drop_config, forget_mapping, own_config
from tests.stack import Stack

pytestmark = pytest.mark.browser

APPOINTMENT = "appt-93af2c6b"


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


def test_clinician_and_patient_click_start_and_land_in_the_same_meeting(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    assert chromium_available(), "run `make browser-deps` (Debian chromium + chromium-driver)"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    s = fresh_stack
    practitioner = seed.APPOINTMENTS[APPOINTMENT].practitioner_id
    forget_mapping(s, practitioner)  # the clinician's first launch: Microsoft sign-in
    upn = s.sandbox.entra.user_for_practitioner(practitioner).upn
    ehr_page = f"{s.sandbox.ehr_url}/?config={config.id}"

    def button(role: str) -> str:
        return f'a.launch[data-role="{role}"][data-appointment="{APPOINTMENT}"]'

    with headless_chromium() as driver:
        wait = WebDriverWait(driver, 30)
        driver.get(ehr_page)
        driver.find_element(By.CSS_SELECTOR, button("clinician")).click()
        account = wait.until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, f'a.account[data-upn="{upn}"]'))
        )
        account.click()
        page = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".join-page")))
        clinician_meeting = page.get_attribute("data-meeting-id")
        assert page.get_attribute("data-mode") == "all"
        assert driver.current_url.startswith(s.sandbox.graph_url)
        assert driver.find_elements(By.CSS_SELECTOR, 'button.join[data-role="organizer"]')

        driver.get(ehr_page)
        driver.find_element(By.CSS_SELECTOR, button("patient")).click()
        page = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".join-page")))
        assert page.get_attribute("data-meeting-id") == clinician_meeting
        assert page.get_attribute("data-mode") == "guest"
        assert "anon=true" in driver.current_url
        assert driver.find_elements(By.CSS_SELECTOR, "form.join-guest")

        # a second click by the clinician: no sign-in any more, straight into the meeting
        driver.get(ehr_page)
        driver.find_element(By.CSS_SELECTOR, button("clinician")).click()
        page = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".join-page")))
        assert page.get_attribute("data-meeting-id") == clinician_meeting
