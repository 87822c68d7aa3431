"""The pages patients and clinicians see speak their language: the waiting page and the error
pages of the launch routes, from ``Accept-Language``, the language cookie or ``?lang=``: a launch
refusal with a reason is translated too, a use case's detail without one stays English and is
marked ``lang="en"``. And the portal's Fluent tokens stylesheet is the one generated from the
installed @fluentui/tokens package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from devtools.sandbox import seed
from devtools.sandbox.ehr import SandboxEhr
from devtools.seed_config import add_approved_config
from tests.stack import Stack

REPO_ROOT = Path(__file__).resolve().parents[2]
WAITING_APPOINTMENT = "appt-0c7d5e82"


def test_launch_error_pages_in_spanish_and_portuguese(stack: Stack) -> None:
    forged = f"{stack.api}/launch/callback?code=x&state=AQforged"
    browser = stack.browser()
    try:
        english = browser.get(forged)
        assert english.status_code == 401 and '<html lang="en"' in english.text
        assert "Reference (correlation id)" in english.text
        browser.client.headers["Accept-Language"] = "es-ES,es;q=0.9"
        spanish = browser.get(forged)
        assert spanish.status_code == 401 and '<html lang="es"' in spanish.text
        assert "Es necesario iniciar sesión" in spanish.text
        assert "Referencia (ID de correlación):" in spanish.text
        # a forged answer (reason state_invalid): translated, message and next step
        assert '<p class="what">Esta respuesta de inicio de sesión no es válida' in spanish.text
        assert '<p class="todo">Vuelva a la HCE y haga clic de nuevo' in spanish.text
        no_state = browser.get(f"{stack.api}/launch/callback?code=x")  # no reason: English
        assert re.search(r'<p class="what" lang="en">[^<]+</p>', no_state.text)
        assert spanish.headers["content-language"] == "es"
        portuguese = browser.get(forged + "&lang=pt-BR")
        assert '<html lang="pt-BR"' in portuguese.text and "É preciso entrar" in portuguese.text
    finally:
        browser.close()


def test_the_waiting_page_in_portuguese_keeps_its_language_across_refreshes(
    stack: Stack, ehr: SandboxEhr
) -> None:
    config = add_approved_config(
        stack.container(),
        tenant_id=stack.tenant(0).tid,
        fhir_base_url=ehr.fhir_base,
        created_by="fixture",
    )
    patient = stack.browser()
    try:
        patient.client.headers["Accept-Language"] = "pt-BR"
        assert WAITING_APPOINTMENT in seed.APPOINTMENTS
        url = ehr.launch_url(config.id, appointment_id=WAITING_APPOINTMENT, user="patient")
        waiting = patient.get(url)
        assert waiting.status_code == 200, waiting.text[:500]
        assert "Sua consulta por vídeo vai começar em breve" in waiting.text
        assert 'content="5;url=/api/launch/wait"' in waiting.text
        switched = patient.get(f"{stack.api}/launch/wait?lang=es")
        assert "Su consulta por vídeo empezará pronto" in switched.text
        assert 'content="5;url=/api/launch/wait?lang=es"' in switched.text
        assert 'hreflang="en"' in switched.text  # the switch
    finally:
        patient.close()
        stack.container().configs.delete(config.tenant_id, config.id)


def test_the_fluent_tokens_stylesheet_matches_the_installed_package() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "devtools.portal_assets", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
