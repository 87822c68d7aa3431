"""The reports page in headless Chromium: an auditor signs in, opens Reports from the
navigation, filters by department, exports the CSV (a real download), and axe-core finds no
serious or critical WCAG 2.2 A/AA violation. Writes docs/screenshots/reports.png."""

from __future__ import annotations

import csv
import io
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connector_core.domain.models import Environment, Region
from connector_core.domain.reports import CSV_COLUMNS, ReportStatus, VisitSummary
from devtools.sandbox.entra import CONTOSO_TID
from tests.browser.test_portal_browser import AXE, Portal, _blocking
from tests.chromium import chromium_available, headless_chromium
from tests.stack import Stack

pytestmark = pytest.mark.browser

TODAY = datetime.now(UTC).date()


@pytest.fixture
def seeded(stack: Stack) -> Iterator[None]:
    entra = stack.sandbox.entra
    clinicians = [u for u in entra.users_in(CONTOSO_TID) if u.kind == "clinician"]
    start = datetime.combine(TODAY, datetime.min.time(), tzinfo=UTC) + timedelta(hours=8)
    rows = []
    for n in range(40):
        day = TODAY - timedelta(days=n % 14)
        no_show = n % 7 == 3
        rows.append(
            VisitSummary(
                visit_key=f"b0b{n:029x}",
                region=Region.AMERICAS,
                tenant_id=CONTOSO_TID,
                config_id="cfg-report-browser",
                day=day,
                environment=Environment.PRODUCTION,
                department_id="DEP-A" if n % 2 else "DEP-B",
                started_at=None if no_show else start - timedelta(days=n % 14, minutes=n),
                duration_seconds=None if no_show else 300 + 37 * n,
                lobby_wait_seconds=None if no_show else 20 + 45 * (n % 9),
                attendants=1 if no_show else 2,
                staff_count=1,
                guest_count=0 if no_show else 1,
                organizer_oid=clinicians[n % len(clinicians)].oid,
                status=ReportStatus.NO_SHOW if no_show else ReportStatus.COMPLETED,
            )
        )
    reports = stack.container().reports
    reports.delete_before(TODAY + timedelta(days=1))
    reports.put_many(rows)
    yield
    reports.delete_before(TODAY + timedelta(days=1))


@pytest.fixture
def driver(stack: Stack) -> Iterator[Any]:
    assert chromium_available(), "run `make browser-deps` (Debian chromium + chromium-driver)"
    assert AXE.is_file(), "run `npm ci` (make deps): axe-core checks every portal page"
    stack.sandbox.reset()
    with headless_chromium() as chromium:
        yield chromium


def test_an_auditor_filters_exports_and_the_page_passes_axe(
    stack: Stack, driver: Any, seeded: None
) -> None:
    from selenium.webdriver.support.ui import Select

    portal = Portal(driver, stack)
    portal.sign_in("auditor")
    portal.click("#nav-reports")
    portal.css("#chart-visits")
    assert portal.css('[data-figure="visits"]').text == "40"
    title = driver.find_element("css selector", "#chart-visits-title")
    assert title.get_attribute("textContent") == "Visits per day"
    portal.axe("reports")
    portal.screenshot("reports", full_page=True)

    portal.type_into("#departmentId", "DEP-A")
    Select(portal.css("#configId")).select_by_index(0)
    portal.click("#apply-filters")
    portal.wait.until(lambda d: "departmentId=DEP-A" in d.current_url)
    rows = driver.find_elements("css selector", "#report-visits tbody tr")
    assert len(rows) == 20
    organizers = {r.find_element("css selector", ".organizer").text for r in rows}
    names = {u.display_name for u in stack.sandbox.entra.users_in(CONTOSO_TID)}
    assert organizers <= names  # resolved from Graph while the page was made
    portal.axe("reports (filtered)")

    downloads = Path(tempfile.mkdtemp(prefix="vv-downloads-"))
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    portal.click("#export-csv")
    deadline = time.monotonic() + 20
    files: list[Path] = []
    while time.monotonic() < deadline:
        files = [p for p in downloads.glob("*.csv")]
        if files and not list(downloads.glob("*.crdownload")):
            break
        time.sleep(0.2)
    assert files, "the CSV was not downloaded"
    exported = list(csv.DictReader(io.StringIO(files[0].read_text(encoding="utf-8"))))
    assert tuple(exported[0]) == CSV_COLUMNS
    assert len(exported) == 20 and {r["departmentId"] for r in exported} == {"DEP-A"}
    assert files[0].name.startswith("visits-")

    # The same page in Spanish, and by keyboard: the language switch keeps working here.
    driver.get(f"{stack.portal}/reports?lang=es")
    portal.css("#chart-visits")
    assert driver.find_element("css selector", "h1").text == "Informes"
    portal.axe("reports (es)")
    assert _blocking(portal.axe_results) == {}
