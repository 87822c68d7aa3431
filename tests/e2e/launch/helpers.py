"""Driving launches through the local host like a person with a browser would."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from connector_core.adapters.smart import normalize_fhir_base
from connector_core.domain.models import EhrUserMapping, TenantConfig, utcnow
from connector_core.domain.visit_keys import ehr_user_key
from devtools.sandbox import seed
from tests.stack import Browser, Stack

_MEETING_ID = re.compile(r'class="join-page" data-meeting-id="([^"]+)" data-mode="(\w+)"')


@dataclass(frozen=True)
class Landing:
    """Where a launch ended: the Teams join page (meeting id, mode) or another page."""

    response: httpx.Response

    @property
    def meeting_id(self) -> str | None:
        match = _MEETING_ID.search(self.response.text)
        return html.unescape(match.group(1)) if match else None

    @property
    def mode(self) -> str | None:
        match = _MEETING_ID.search(self.response.text)
        return match.group(2) if match else None

    @property
    def host(self) -> str:
        return urlsplit(str(self.response.url)).netloc


def own_config(stack: Stack) -> TenantConfig:
    """A new approved config for the sandbox EHR (its visits are all new). One config per FHIR
    URL and environment may exist in a tenant: a leftover of another test is removed first."""
    from connector_core.errors import ConflictError

    try:
        return stack.create_approved_config()
    except ConflictError as conflict:
        existing = conflict.extra.get("existingId")
        if not existing:
            raise
        stack.container().configs.delete(stack.tenant(0).tid, str(existing))
        return stack.create_approved_config()


def drop_config(stack: Stack, config: TenantConfig) -> None:
    stack.container().configs.delete(config.tenant_id, config.id)


def user_key(stack: Stack, practitioner_id: str) -> str:
    container = stack.container()
    return ehr_user_key(
        container.keyring,
        normalize_fhir_base(stack.sandbox.fhir_base),
        f"Practitioner/{practitioner_id}",
    )


def forget_mapping(stack: Stack, practitioner_id: str) -> None:
    """As if this clinician never launched: no mapping in the table or the worker's cache."""
    key = user_key(stack, practitioner_id)
    container = stack.container()
    container.mappings.delete(key)
    container.launch_cache.forget_mapping(key)


def set_mapping(stack: Stack, practitioner_id: str, oid: str) -> None:
    container = stack.container()
    key = user_key(stack, practitioner_id)
    now = utcnow()
    tid = stack.tenant(0).tid
    container.mappings.upsert(
        EhrUserMapping(
            ehr_user_key=key,
            region=container.settings.region,
            tenant_id=tid,
            entra_oid=oid,
            entra_tid=tid,
            created_at=now,
            last_used_at=now,
        )
    )
    container.launch_cache.forget_mapping(key)


def pick_account(browser: Browser, page: httpx.Response, upn: str) -> httpx.Response:
    """Click the account on the Entra stand-in's account picker."""
    pattern = re.compile(
        r'<a class="account[^"]*" data-upn="'
        + re.escape(html.escape(upn))
        + r'"[^>]*href="([^"]+)"'
    )
    match = pattern.search(page.text)
    assert match, f"no account {upn} on the picker page ({page.url})"
    return browser.get(html.unescape(match.group(1)))


def is_entra_picker(response: httpx.Response) -> bool:
    return "/oauth2/v2.0/authorize" in str(response.url) and 'class="accounts"' in response.text


def clinician_launch(
    stack: Stack,
    browser: Browser,
    config: TenantConfig,
    appointment_id: str,
    *,
    practitioner_id: str | None = None,
    expect_signin: bool,
) -> Landing:
    practitioner_id = practitioner_id or seed.APPOINTMENTS[appointment_id].practitioner_id
    url = stack.sandbox.ehr.launch_url(
        config.id, appointment_id=appointment_id, user="clinician", practitioner_id=practitioner_id
    )
    response = browser.get(url)
    assert is_entra_picker(response) == expect_signin, (response.status_code, response.text[:500])
    if expect_signin:
        upn = stack.sandbox.entra.user_for_practitioner(practitioner_id).upn
        response = pick_account(browser, response, upn)
    return Landing(response)


def patient_launch(
    stack: Stack, browser: Browser, config: TenantConfig, appointment_id: str
) -> Landing:
    url = stack.sandbox.ehr.launch_url(config.id, appointment_id=appointment_id, user="patient")
    return Landing(browser.get(url))


def subscriptions_when_settled(
    stack: Stack, meeting_id: str, *, timeout: float = 20.0
) -> list[Any]:
    """The meeting's Graph subscriptions once the ``meeting-subscriptions`` worker has created
    one (it runs after the launch answered) and no request for it is left in the queue."""
    import time

    from azure.storage.queue import QueueClient

    from connector_core.service.subscriptions import SUBSCRIPTION_QUEUE

    queue = QueueClient.from_connection_string(stack.azurite.connection_string, SUBSCRIPTION_QUEUE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = stack.sandbox.graph.subscriptions_for(meeting_id)
        # the count includes messages being processed (invisible)
        if found and queue.get_queue_properties().approximate_message_count == 0:
            time.sleep(0.3)  # a racing worker's discard settles
            return list(stack.sandbox.graph.subscriptions_for(meeting_id))
        time.sleep(0.1)
    raise AssertionError(f"no subscription for the meeting within {timeout} s")
