"""The configuration portal in headless Chromium, as its people use it, on the sandbox.

The seed flow end to end: the admin signs in (Entra stand-in), creates a test and a production
configuration, picking the approver from the directory (Graph ``$search``); the approver signs
in, signs in to the EHR, approves and copies the integration records (clipboard); a clinician
launch built from the copied Epic record then reaches the meeting. Negative paths: a user
without a role, a form posted from another site, an expired session, an invalid URL. Every
portal page is checked with axe-core (npm, injected into the page) for WCAG 2.2 A/AA: no
serious or critical violation. The admin's task is also done by keyboard alone. docs/portal.md's
screenshots (docs/screenshots/) are written by this run, so they never go stale.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from connector_core.domain.models import utcnow
from devtools._serve import ServerThread
from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr
from tests.chromium import chromium_available, headless_chromium
from tests.stack import Stack, delete_configs_of, own_ehr

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[2]
AXE = REPO_ROOT / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]
BLOCKING = {"serious", "critical"}
APPOINTMENT = "appt-93af2c6b"
TIMEOUT = 30


@pytest.fixture(scope="module")
def ehr(stack: Stack) -> Iterator[SandboxEhr]:
    """An EHR server of this module's own: its FHIR base URLs are unique to these tests."""
    with own_ehr(stack, "portal-browser-ehr") as instance:
        yield instance


@pytest.fixture
def driver(stack: Stack, ehr: SandboxEhr) -> Iterator[Any]:
    assert chromium_available(), "run `make browser-deps` (Debian chromium + chromium-driver)"
    assert AXE.is_file(), "run `npm ci` (make deps): axe-core checks every portal page"
    delete_configs_of(stack, ehr.base_url)
    stack.sandbox.reset()
    with headless_chromium() as chromium:
        chromium.set_script_timeout(TIMEOUT)
        yield chromium
    delete_configs_of(stack, ehr.base_url)


# --- helpers ------------------------------------------------------------------------------------


class Portal:
    """A person at the browser: waits, clicks, types; axe and screenshots along the way."""

    def __init__(self, driver: Any, stack: Stack) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.stack = stack
        self.wait = WebDriverWait(driver, TIMEOUT)
        self.axe_results: dict[str, dict[str, Any]] = {}

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, selector)))

    def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        self.wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, selector))).click()

    def ready(self) -> None:
        self.wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

    def sign_in(self, persona: str) -> None:
        self.driver.get(self.stack.portal)
        self.click("#signin-button")
        self.click(f'a.account[data-persona="{persona}"]')
        self.css("main#main h1")
        self.ready()

    def sign_out(self) -> None:
        self.click(".account button[type=submit]")
        self.css("#signin-button")

    def axe(self, name: str) -> dict[str, Any]:
        """axe-core's WCAG 2.2 A/AA (and best-practice) results for the page as it is now."""
        self.ready()
        self.driver.execute_script(AXE.read_text())
        result: dict[str, Any] = self.driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            axe.run(document, {runOnly: {type: "tag", values: arguments[0]}})
              .then(r => done({
                violations: r.violations.map(v => ({
                  id: v.id, impact: v.impact, help: v.help,
                  nodes: v.nodes.slice(0, 5).map(n => n.target.join(" "))})),
                passes: r.passes.length, incomplete: r.incomplete.length}))
              .catch(e => done({error: String(e)}));
            """,
            AXE_TAGS,
        )
        assert "error" not in result, result
        self.axe_results[name] = result
        return result

    def screenshot(self, name: str, *, full_page: bool = False) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        size = self.driver.get_window_size()
        if full_page:
            self.driver.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(size["width"], min(int(height) + 120, 4000))
        time.sleep(0.2)  # let the layout settle after a resize or a live-region update
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
        if full_page:
            self.driver.set_window_size(size["width"], size["height"])

    def type_into(self, selector: str, text: str) -> Any:
        field = self.css(selector)
        field.clear()
        field.send_keys(text)
        return field

    def pick_approver(self, search: str, upn: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.type_into("#approverUpn", search)
        self.css(f'#approver-options [role="option"][data-upn="{upn}"]')
        self.wait.until(lambda d: box.get_attribute("aria-expanded") == "true")
        box.send_keys(Keys.ARROW_DOWN)
        assert box.get_attribute("aria-activedescendant") == "approver-option-0"
        box.send_keys(Keys.ENTER)  # chooses; does not submit the form
        self.wait.until(lambda d: box.get_attribute("value") == upn)
        assert box.get_attribute("aria-expanded") == "false"


def _blocking(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        page: [v for v in result["violations"] if v["impact"] in BLOCKING]
        for page, result in results.items()
        if any(v["impact"] in BLOCKING for v in result["violations"])
    }


def _launch_from_record(record: str, ehr: SandboxEhr, profile: str) -> str:
    """What Epic does with the FDI record's launch URL: fill its tokens, add iss and launch."""
    from urllib.parse import urlencode

    # made-up department and contact serial numbers (the launch context comes from `launch`)
    filled = record.replace("%PERFDEPID%", "10501").replace("%CSN%", "880012")
    epic = ehr.profile(profile)
    launch = epic.make_launch(appointment_id=APPOINTMENT, user="clinician")
    return f"{filled}&{urlencode({'iss': epic.fhir_base, 'launch': launch})}"


# --- the seed flow ------------------------------------------------------------------------------


def test_admin_and_approver_walk_the_seed_flow_and_a_clinician_launch_works(
    stack: Stack, ehr: SandboxEhr, driver: Any
) -> None:
    from selenium.webdriver.common.by import By

    s = stack
    portal = Portal(driver, s)
    entra = s.sandbox.entra
    approver = entra.persona("approver").upn
    epic = ehr.profile("epic")

    # 1. the admin signs in
    driver.get(s.portal)
    portal.css("#signin-button")
    portal.axe("sign-in")
    portal.screenshot("1-sign-in")
    portal.sign_in("admin")
    portal.css("#new-config")
    portal.axe("configurations (empty)")

    # 2. test and production configurations, the approver picked from the directory
    config_ids: dict[str, str] = {}
    for environment in ("test", "production"):
        portal.click("#new-config")
        portal.type_into("#fhirBaseUrl", epic.fhir_base)
        portal.click(f"#environment-{environment}")
        portal.pick_approver("thorn", approver)
        if environment == "test":
            portal.type_into("#approverUpn", "thorn")  # show the picker open for the screenshot
            portal.css('#approver-options [role="option"]')
            portal.axe("new configuration (picker open)")
            portal.screenshot("2-new-configuration")
            portal.pick_approver("thorn", approver)
        portal.click("#save")
        heading = portal.css("h1[data-config-id]")
        config_ids[environment] = heading.get_attribute("data-config-id")
        assert "Configuration created" in driver.page_source
        portal.css("#waiting-for-approver")
        portal.driver.get(s.portal)
    driver.get(f"{s.portal}/configs/{config_ids['test']}")
    portal.css("#waiting-for-approver")
    portal.axe("configuration (waiting for the approver)")

    # an invalid URL comes back inline, with the API's message; DSTU2 offers R4 in one click
    portal.click("a.app-name")
    portal.click("#new-config")
    portal.type_into("#fhirBaseUrl", "not a url")
    portal.type_into("#approverUpn", approver)
    portal.click("#save")
    summary = portal.css("#error-summary")
    assert driver.switch_to.active_element == summary  # focus moves to the problem
    assert "This is not a valid URL." in summary.text
    portal.axe("new configuration (invalid URL)")
    portal.type_into("#fhirBaseUrl", ehr.dstu2_base)
    portal.type_into("#approverUpn", approver)
    portal.click("#environment-production")
    portal.click("#save")
    portal.css("#use-suggested")
    portal.screenshot("form-dstu2-suggestion")
    portal.click("#use-suggested")
    assert portal.css("h1[data-config-id]").text == ehr.fhir_base  # the server's R4 endpoint
    assert "Configuration created" in driver.page_source

    driver.get(s.portal)
    rows = driver.find_elements(By.CSS_SELECTOR, "#configs tbody tr")
    assert {r.get_attribute("data-config-id") for r in rows} >= set(config_ids.values())
    portal.axe("configurations")
    portal.screenshot("3-configurations")
    size = driver.get_window_size()
    driver.set_window_size(390, 844)  # a phone: the table becomes stacked cards
    portal.axe("configurations (phone width)")
    portal.screenshot("configurations-phone")
    driver.set_window_size(size["width"], size["height"])
    driver.get(f"{s.portal}?lang=pt-BR")
    portal.css("#configs")
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "pt-BR"
    portal.axe("configurations (pt-BR)")
    portal.screenshot("configurations-pt-BR")
    driver.get(f"{s.portal}?lang=en")
    portal.sign_out()

    # 3. the approver signs in, then signs in to the EHR
    portal.sign_in("approver")
    portal.click(f'tr[data-config-id="{config_ids["test"]}"] a')
    portal.css("#ehr-signin")
    portal.axe("approval (approver)")
    portal.screenshot("4-approval")
    portal.click("#ehr-signin")
    portal.click(f'a.user[data-user-id="{seed.ANALYST_ID}"]')  # the sandbox EHR's sign-in page
    portal.css("#approve")
    assert "Your EHR sign-in was recorded" in driver.page_source

    # 4. approves; the integration records appear
    portal.click("#approve")
    records = portal.css("#integration-records")
    assert portal.css("#status").text == "Approved"
    portal.axe("integration records")
    portal.screenshot("5-integration-records", full_page=True)

    # 5. copies them (the clipboard holds exactly what the page shows)
    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"], "origin": s.url},
    )
    launch_record = records.find_element(
        By.CSS_SELECTOR, '[data-group="epic-provider"] [data-key="launch-url"] code'
    ).text
    assert launch_record.endswith("?departmentId=%PERFDEPID%&sessionId=%CSN%")
    copy = records.find_element(
        By.CSS_SELECTOR, '[data-group="epic-provider"] [data-key="launch-url"] button.copy'
    )
    copy.click()
    portal.wait.until(lambda d: d.find_element(By.ID, "copy-status").text != "")
    assert driver.find_element(By.ID, "copy-status").get_attribute("textContent") == (
        "Copied to the clipboard."
    )
    copied = driver.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('ERR ' + e));"
    )
    assert copied == launch_record
    group = records.find_element(
        By.CSS_SELECTOR, '[data-group="epic-group"] [data-key="provider-launch-url"] code'
    ).text
    assert group.endswith("sessionId=%CONFERENCEID%")

    driver.get(f"{s.portal}/configs/{config_ids['test']}/history")
    portal.css("#history")
    portal.axe("history")
    portal.screenshot("history")
    portal.sign_out()

    # a clinician launch with the copied record works: the EHR fills the tokens, adds iss/launch
    clinician = entra.user_for_practitioner(seed.APPOINTMENTS[APPOINTMENT].practitioner_id)
    driver.get(_launch_from_record(copied, ehr, "epic"))
    portal.click(f'a.account[data-upn="{clinician.upn}"]')  # first launch: Microsoft sign-in
    # a portal-made config lands the clinician on the visit page, which opens the meeting
    portal.css("#visit[data-mode]")
    assert "/api/visits/" in driver.current_url
    portal.axe("clinician's visit page")
    meeting = driver.find_element(By.CSS_SELECTOR, 'a.open[data-open="browser"]')
    join_url = meeting.get_attribute("href")
    assert join_url and join_url.startswith(s.sandbox.graph_url)
    driver.get(join_url)
    page = portal.css(".join-page")
    assert page.get_attribute("data-mode") == "all"

    # admin pages not seen yet: edit, delete confirmation, an error page
    portal.sign_in("admin")
    driver.get(f"{s.portal}/configs/{config_ids['production']}/edit")
    portal.css("#config-form")
    portal.axe("change configuration")
    driver.get(f"{s.portal}/configs/{config_ids['production']}/delete")
    portal.css("#confirm-delete")
    portal.axe("delete confirmation")
    driver.get(f"{s.portal}/configs/0123456789abcdef0123456789abcdef")
    portal.css("#error-title")
    portal.axe("error page")

    (REPO_ROOT / "docs" / "screenshots" / "axe-results.json").write_text(
        json.dumps(
            {
                page: {
                    "violations": sorted(f"{v['id']} ({v['impact']})" for v in r["violations"]),
                    "passes": r["passes"],
                }
                for page, r in sorted(portal.axe_results.items())
            },
            indent=2,
        )
        + "\n"
    )
    assert _blocking(portal.axe_results) == {}
    # the README says so: not even a moderate or minor finding on a portal page
    assert {
        page: r["violations"] for page, r in portal.axe_results.items() if r["violations"]
    } == {}


# --- negative paths in the browser ---------------------------------------------------------------


async def _attacker(request: Request) -> HTMLResponse:
    """Another site's page that posts a configuration to the portal as soon as it opens."""
    target = request.query_params["target"]
    fhir = request.query_params["fhir"]
    approver = request.query_params["approver"]
    return HTMLResponse(
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Win a prize</title>'
        '</head><body><form id="f" method="post" action="' + target + '">'
        f'<input name="fhirBaseUrl" value="{fhir}"><input name="approverUpn" value="{approver}">'
        '<input name="environment" value="test"><input name="csrf" value="guessed"></form>'
        "<script>document.getElementById('f').submit()</script></body></html>"
    )


def test_no_role_forged_form_expired_session_in_the_browser(
    stack: Stack, ehr: SandboxEhr, driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from urllib.parse import urlencode

    s = stack
    portal = Portal(driver, s)
    # a user with no role: told what to ask for; the admin page is a friendly 403
    portal.sign_in("no-role")
    portal.css("#no-role")
    portal.axe("configurations (no role)")
    driver.get(f"{s.portal}/configs/new")
    assert "Connector.Admin" in portal.css("main").text
    portal.axe("not allowed")
    portal.sign_out()

    # a form posted by another site while the admin is signed in: refused, nothing created
    portal.sign_in("admin")
    with ServerThread(Starlette(routes=[Route("/", _attacker)]), name="attacker") as evil:
        other_site = evil.url.replace("127.0.0.1", "localhost")
        query = urlencode(
            {
                "target": f"{s.portal}/configs",
                "fhir": ehr.fhir_base,
                "approver": s.sandbox.entra.persona("approver").upn,
            }
        )
        driver.get(f"{other_site}/?{query}")
        portal.wait.until(lambda d: d.current_url.startswith(s.portal))
        portal.css("main h1")
        assert "Configuration created" not in driver.page_source
    tid = s.tenant(0).tid
    assert s.container().configs.find_id_by_url(tid, "test", ehr.fhir_base) is None

    # an expired session: the next page says so and asks to sign in again
    driver.get(f"{s.portal}/configs/new")
    portal.css("#config-form")
    later = utcnow() + timedelta(minutes=31)
    monkeypatch.setattr(s.container(), "clock", lambda: later)
    portal.type_into("#fhirBaseUrl", ehr.fhir_base)
    portal.type_into("#approverUpn", s.sandbox.entra.persona("approver").upn)
    portal.click("#save")
    portal.css("#signin-button")
    assert "Your session expired" in driver.page_source
    portal.axe("session expired")
    assert s.container().configs.find_id_by_url(tid, "test", ehr.fhir_base) is None
    assert {
        page: r["violations"] for page, r in portal.axe_results.items() if r["violations"]
    } == {}


def test_the_admin_creates_a_configuration_by_keyboard_alone(
    stack: Stack, ehr: SandboxEhr, driver: Any
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    s = stack
    portal = Portal(driver, s)
    portal.sign_in("admin")  # the account picker is the Entra stand-in's, not the portal
    keys = ActionChains(driver)
    active: Callable[[], Any] = lambda: driver.switch_to.active_element  # noqa: E731

    def tab_to(element_id: str, limit: int = 25) -> Any:
        for _ in range(limit):
            ActionChains(driver).send_keys(Keys.TAB).perform()
            element = active()
            if element.get_attribute("id") == element_id:
                outline = driver.execute_script(
                    "return getComputedStyle(arguments[0]).outlineStyle", element
                )
                assert outline != "none", f"#{element_id} has no visible focus indicator"
                return element
        raise AssertionError(f"#{element_id} is not reachable with Tab")

    driver.get(s.portal)  # a fresh page: focus starts at the top of the document
    portal.ready()
    ActionChains(driver).send_keys(Keys.TAB).perform()
    assert "skip-link" in (active().get_attribute("class") or "")  # the first stop
    tab_to("new-config").send_keys(Keys.ENTER)
    portal.css("#config-form")
    tab_to("fhirBaseUrl").send_keys(ehr.profile("epic").fhir_base)
    tab_to("environment-test").send_keys(Keys.ARROW_RIGHT)  # radios: arrows choose
    assert driver.find_element("id", "environment-production").is_selected()
    ActionChains(driver).send_keys(Keys.TAB).perform()
    assert active().get_attribute("id") == "ehrVendor"
    box = tab_to("approverUpn")
    box.send_keys("perpetua")
    portal.css('#approver-options [role="option"]')
    box.send_keys(Keys.ARROW_DOWN, Keys.ENTER)
    portal.wait.until(
        lambda d: box.get_attribute("value") == s.sandbox.entra.persona("approver").upn
    )
    box.send_keys(Keys.ESCAPE)
    tab_to("save").send_keys(Keys.ENTER)
    heading = portal.css("h1[data-config-id]")
    assert "Configuration created" in driver.page_source
    assert "Production" in portal.css("#status").find_element("xpath", "..").text
    assert heading.text == ehr.profile("epic").fhir_base
    keys.reset_actions()


def test_the_approver_picker_keeps_its_list_and_its_choice_against_late_timers(
    stack: Stack, ehr: SandboxEhr, driver: Any
) -> None:
    """Two timers of the picker must not undo what the user just did: the close that follows a
    blur (the user came back within it) and a search still waiting for the typing to pause
    (the user chose from the list already shown; its answer would open the list again)."""
    from selenium.webdriver.common.keys import Keys

    portal = Portal(driver, stack)
    portal.sign_in("admin")
    portal.click("#new-config")
    upn = stack.sandbox.entra.persona("approver").upn
    box = portal.type_into("#approverUpn", "thorn")
    portal.css(f'#approver-options [role="option"][data-upn="{upn}"]')
    portal.wait.until(lambda d: box.get_attribute("aria-expanded") == "true")

    driver.execute_script("arguments[0].blur(); arguments[0].focus();", box)
    time.sleep(0.5)  # past the 150 ms close that the blur scheduled
    assert box.get_attribute("aria-expanded") == "true"

    # Typing schedules a search for 250 ms later; the user picks from the list shown before it.
    box.send_keys(Keys.BACKSPACE, Keys.ARROW_DOWN, Keys.ENTER)
    assert box.get_attribute("value") == upn
    time.sleep(1.0)  # the search would have run and answered by now (the UPN finds the user)
    assert box.get_attribute("value") == upn
    assert box.get_attribute("aria-expanded") == "false"
    assert "/configs/new" in driver.current_url or portal.css("#config-form")  # not submitted


def test_the_patients_pages_in_chromium_with_axe(
    stack: Stack, ehr: SandboxEhr, driver: Any
) -> None:
    """The waiting page and launch error pages, in Portuguese and Spanish: no serious or
    critical violation (the waiting page asks in the background instead of refreshing itself);
    the error pages say what happened and what to do in the page's language."""
    from devtools.seed_config import add_approved_config

    s = stack
    portal = Portal(driver, s)
    config = add_approved_config(
        s.container(), tenant_id=s.tenant(0).tid, fhir_base_url=ehr.fhir_base, created_by="fixture"
    )
    driver.get(f"{s.api}/launch/callback?code=x&state=AQforged&lang=pt-BR")
    assert portal.css("h1").text == "É preciso entrar"
    assert portal.css("p.what").text.startswith("Esta resposta de entrada não é válida")
    assert (
        portal.css("p.todo").text == "Volte ao EHR e clique novamente em Iniciar consulta virtual."
    )
    assert portal.css("p.what").get_attribute("lang") in (None, "")  # the page's language
    portal.axe("launch error (pt-BR)")
    driver.get(f"{s.api}/launch/callback?code=x&state=AQforged&lang=es")
    assert portal.css("p.todo").text.startswith("Vuelva a la HCE y haga clic de nuevo")
    portal.axe("launch error (es)")
    driver.get(ehr.launch_url(config.id, appointment_id="appt-0c7d5e82", user="patient"))
    driver.get(f"{s.api}/launch/wait?lang=pt-BR")
    assert "Sua consulta por vídeo" in portal.css("h1").text
    portal.axe("waiting page (pt-BR)")
    blocking = _blocking(portal.axe_results)
    assert "launch error (pt-BR)" not in blocking
    assert "launch error (es)" not in blocking
    assert "waiting page (pt-BR)" not in blocking, blocking
