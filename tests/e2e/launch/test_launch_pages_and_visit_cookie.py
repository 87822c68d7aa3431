"""Over real HTTP (sandbox EHR -> local host), with a browser-like client: a reloaded callback
says "already used" in the reader's language; one clinician browser that launches two visits
keeps both visit pages and live views, and a ninth evicts the oldest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connector_core.domain.models import ProviderLanding, TenantConfig
from connector_core.errors import ConflictError
from connector_core.service.visit_cookie import MAX_VISITS
from devtools.sandbox import seed
from devtools.seed_config import add_approved_config
from tests.e2e.launch.helpers import drop_config, set_mapping
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow

SOLO = "appt-6b1e0d34"


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    """An approved config whose provider launch lands on the visit page."""

    def create() -> TenantConfig:
        return add_approved_config(
            fresh_stack.container(),
            tenant_id=fresh_stack.tenant(0).tid,
            fhir_base_url=fresh_stack.sandbox.fhir_base,
            created_by="fixture",
            provider_landing=ProviderLanding.VISIT_PAGE,
        )

    try:
        created = create()
    except ConflictError as conflict:  # a leftover of another test for this FHIR URL
        fresh_stack.container().configs.delete(
            fresh_stack.tenant(0).tid, str(conflict.extra["existingId"])
        )
        created = create()
    practitioner = seed.APPOINTMENTS[SOLO].practitioner_id
    set_mapping(
        fresh_stack, practitioner, fresh_stack.sandbox.entra.user_for_practitioner(practitioner).oid
    )
    yield created
    drop_config(fresh_stack, created)


def _visit(s: Stack, browser: Browser, config: TenantConfig, conference: str) -> str:
    """The clinician opens the visit of ``conference`` from the EHR: its visit key."""
    url = s.sandbox.ehr.launch_url(
        config.id, appointment_id=SOLO, user="clinician", conference_id=conference
    )
    page = browser.get(url)
    assert page.status_code == 200 and "/api/visits/" in str(page.url), page.text[:500]
    return str(page.url).rsplit("/", 1)[-1]


def _opens(s: Stack, browser: Browser, key: str) -> tuple[int, int]:
    page = browser.get(f"{s.api}/visits/{key}")
    view = browser.client.get(
        f"{s.api}/visits/{key}/participants", headers={"Accept": "application/json"}
    )
    return page.status_code, view.status_code


def test_two_visits_in_one_browser_keep_both_pages_and_a_ninth_evicts_the_oldest(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    browser = s.browser()
    try:
        keys = [_visit(s, browser, config, "conf-e2e-cookie-0")]
        keys.append(_visit(s, browser, config, "conf-e2e-cookie-1"))
        assert keys[0] != keys[1]
        assert _opens(s, browser, keys[0]) == (200, 200)  # the first visit is still open
        assert _opens(s, browser, keys[1]) == (200, 200)
        for n in range(2, MAX_VISITS + 1):
            keys.append(_visit(s, browser, config, f"conf-e2e-cookie-{n}"))
        assert _opens(s, browser, keys[0]) == (403, 403)  # the ninth evicted the oldest
        assert _opens(s, browser, keys[1]) == (200, 200)
        assert _opens(s, browser, keys[-1]) == (200, 200)
        sent = next(c.value for c in browser.jar if c.name == "__Host-vv-visit")
        assert sent is not None and len(sent) < 1200
    finally:
        browser.close()


@pytest.mark.parametrize(
    ("language", "message", "next_step"),
    [
        (
            "pt-BR",
            "Este link de inicialização já foi usado",
            "Volte ao EHR e clique novamente em Iniciar consulta virtual. Cada clique gera um "
            "novo link.",
        ),
        (
            "es",
            "Este enlace de inicio ya se usó",
            "Vuelva a la HCE y haga clic de nuevo en Iniciar visita virtual. Cada clic genera un "
            "enlace nuevo.",
        ),
    ],
)
def test_a_reloaded_callback_says_already_used_in_the_readers_language(
    fresh_stack: Stack, config: TenantConfig, language: str, message: str, next_step: str
) -> None:
    s = fresh_stack
    browser = s.browser()
    try:
        browser.client.headers["Accept-Language"] = language
        url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
        opened = browser.get(url)
        assert opened.status_code == 200, opened.text[:500]
        callback = next(
            str(r.url) for r in [*opened.history, opened] if "/launch/callback" in str(r.url)
        )
        again = browser.get(callback)  # the reload
        assert again.status_code == 401 and again.headers["content-language"] == language
        assert f'<p class="what">{message}' in again.text
        assert f'<p class="todo">{next_step}</p>' in again.text
        assert "Reference (correlation id)" not in again.text  # the page is all translated
    finally:
        browser.close()
