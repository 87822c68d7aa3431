"""Faults during a launch, injected at the sandbox servers (real HTTP, no mocks): the browser
gets a clear page with a correlation id, and starting again from the EHR works.

* the EHR's token endpoint answers 500, or does not answer within the connector's read
  timeout (``Container.http``: 10 s; no setting lowers it, so one test waits ~10.5 s);
* Graph answers 503 with ``Retry-After`` (retried, honoured), or keeps answering 503 (a page);
* Graph refuses the call-event subscription (the clinician still enters the meeting; the next
  launch of the visit creates it);
* the Entra token endpoint fails during the clinician's first sign-in.

Write-back faults (EHR down, poison queue and replay) are in tests/e2e/presence/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from tests.e2e.launch.helpers import (
    clinician_launch,
    drop_config,
    forget_mapping,
    own_config,
    patient_launch,
    pick_account,
    set_mapping,
)
from tests.e2e.presence._flow import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

SOLO = "appt-6b1e0d34"
PRACTITIONER = seed.APPOINTMENTS[SOLO].practitioner_id


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


@pytest.fixture
def mapped(fresh_stack: Stack) -> Stack:
    oid = fresh_stack.sandbox.entra.user_for_practitioner(PRACTITIONER).oid
    set_mapping(fresh_stack, PRACTITIONER, oid)
    return fresh_stack


def _clear_page(response: httpx.Response, status: int, *needles: str) -> str:
    """A short HTML page: what happened, what to do, the correlation id; never a trace."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("text/html")
    text = response.text
    for needle in needles:
        assert needle in text, text
    assert "Reference (correlation id)" in text and "Traceback" not in text
    cid = response.headers["x-correlation-id"]
    assert cid in text
    return cid


def _launch(s: Stack, config: TenantConfig) -> httpx.Response:
    return s.browser().get(
        s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
    )


def _meeting_count(s: Stack, config: TenantConfig) -> int:
    key = s.container().keyring.keyed_hash("visit", config.id, "appointment", SOLO)
    return sum(1 for m in list(s.sandbox.graph.meetings.values()) if m.external_id == key)


def test_ehr_token_endpoint_500_is_a_clear_page_and_a_new_launch_works(
    mapped: Stack, config: TenantConfig
) -> None:
    s = mapped
    s.sandbox.ehr.fail_next("token", status=500)
    response = _launch(s, config)
    cid = _clear_page(response, 502, "code exchange", "(server_error)", "again")
    # The page names the step, not what the EHR answered (the random correlation id aside).
    assert "500" not in response.text.replace(cid, "")
    logged = [line for line in s.logs.lines if f"correlation_id={cid}" in line]
    assert any("ehr.call_failed" in line and "status=500" in line for line in logged), logged
    assert _meeting_count(s, config) == 0
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id and _meeting_count(s, config) == 1


def test_ehr_token_endpoint_timeout_is_a_clear_page_and_a_new_launch_works(
    mapped: Stack, config: TenantConfig
) -> None:
    s = mapped
    read_timeout = s.container().ehr_http.timeout.read  # every EHR call uses the guarded client
    assert read_timeout is not None and read_timeout <= 10.0
    # answers (normally) only after the connector stopped waiting
    s.sandbox.ehr.fail_next("token", status=200, delay=read_timeout + 0.5)
    started = time.monotonic()
    response = _launch(s, config)
    elapsed = time.monotonic() - started
    _clear_page(response, 502, "could not be reached")
    assert read_timeout <= elapsed < read_timeout + 5  # bounded: gives up at the timeout
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id and _meeting_count(s, config) == 1


def test_patient_launch_token_endpoint_500_then_works(mapped: Stack, config: TenantConfig) -> None:
    s = mapped
    s.sandbox.ehr.fail_next("token", status=503)
    url = s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="patient")
    _clear_page(s.browser().get(url), 502, "code exchange", "temporarily_unavailable")
    landing = patient_launch(s, s.browser(), config, SOLO)
    assert landing.meeting_id  # created as the mapped clinician, joined as a guest
    assert landing.mode == "guest" or "anon=true" in str(landing.response.url)


def test_graph_503_with_retry_after_is_retried_then_succeeds(
    mapped: Stack, config: TenantConfig
) -> None:
    s = mapped
    s.sandbox.graph.fail_next("createOrGet", 503, retry_after=1)
    started = time.monotonic()
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id
    assert time.monotonic() - started >= 1.0  # Retry-After honoured
    statuses = [st for _, path, st in list(s.sandbox.graph.requests) if "createOrGet" in path]
    assert statuses[-2:] == [503, 201]
    assert "graph.retry" in s.logs.text()


def test_graph_503_that_does_not_end_is_a_clear_page_then_a_new_launch_works(
    mapped: Stack, config: TenantConfig
) -> None:
    s = mapped
    before = len(s.sandbox.graph.requests)
    s.sandbox.graph.fail_next("createOrGet", 503, count=4, retry_after=0.2)
    _clear_page(_launch(s, config), 502, "again")
    tries = [st for _, path, st in list(s.sandbox.graph.requests)[before:] if "createOrGet" in path]
    assert tries == [503, 503, 503, 503]  # bounded: at most 4 attempts
    landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert landing.meeting_id and _meeting_count(s, config) == 1


def test_graph_refusing_the_subscription_does_not_block_the_clinician(
    mapped: Stack, config: TenantConfig
) -> None:
    s = mapped
    s.sandbox.graph.fail_next("subscriptions", 500)
    first = clinician_launch(s, s.browser(), config, SOLO, expect_signin=False)
    assert first.meeting_id
    # The queue worker tried, Graph refused; it retries with backoff, no launch needed.
    key = s.container().keyring.keyed_hash("visit", config.id, "appointment", SOLO)
    active = wait_for(
        lambda: [x for x in s.sandbox.graph.subscriptions_for(first.meeting_id) if x.active],
        timeout=30,
        what="the subscription after a retry",
    )
    assert len(active) == 1
    wait_for(lambda: s.container().visits.get(key).record.subscription_id == active[0].id)
    assert "subscription.retry" in s.logs.text()


def test_entra_token_endpoint_500_during_first_sign_in_then_works(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    forget_mapping(s, PRACTITIONER)
    s.sandbox.entra.fail_next("token", 500)
    browser = s.browser()
    picker = browser.get(s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician"))
    upn = s.sandbox.entra.user_for_practitioner(PRACTITIONER).upn
    response = pick_account(browser, picker, upn)
    _clear_page(response, 502, "Microsoft Entra ID failed", "Start the visit again")
    # msal throttles a token endpoint that answered 5xx for a few seconds (5 s without a
    # Retry-After): launches in that window get the same clear page; then one goes through.
    started = time.monotonic()
    while True:
        landing = clinician_launch(s, s.browser(), config, SOLO, expect_signin=True)
        if landing.meeting_id or time.monotonic() - started > 15:
            break
        _clear_page(landing.response, 502, "Microsoft Entra ID failed")
        time.sleep(1.0)
    assert landing.meeting_id, landing.response.text
