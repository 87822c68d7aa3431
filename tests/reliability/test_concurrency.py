"""Concurrency over real HTTP on loopback (bounded thread pools, bounded waits).

* 50 browsers launch the same visit at once, clinicians and patients mixed, each with its own
  cookies through the whole flow (the clinicians' first Microsoft sign-in included; patients
  who arrive before the meeting exists wait and poll): exactly one Teams meeting for the visit
  at the Graph stand-in, exactly one live call-event subscription (any extra one created in a
  race is deleted at Graph and in the table), one visit record, one EHR user mapping, and every
  browser ends up in that meeting.
* Concurrent approvals and edits of one config with the same ``If-Match``: exactly one wins,
  the others get 412, and the stored config is the winner's.
"""

from __future__ import annotations

import html
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from devtools.sandbox.ehr import find_signin_link
from tests.e2e.launch.helpers import (
    Landing,
    drop_config,
    forget_mapping,
    own_config,
    subscriptions_when_settled,
    user_key,
)
from tests.e2e.presence._flow import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow

SOLO = "appt-6b1e0d34"
PRACTITIONER = seed.APPOINTMENTS[SOLO].practitioner_id
CLINICIANS = 12
PATIENTS = 38
WAIT_LIMIT = 60.0  # seconds a patient browser keeps polling the waiting page


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


@dataclass
class Outcome:
    role: str
    meeting_id: str | None
    mode: str | None
    statuses: list[int]
    waited: bool = False
    error: str = ""


def _clinician(s: Stack, config: TenantConfig, upn: str) -> Outcome:
    browser = s.browser()
    statuses: list[int] = []
    try:
        response = browser.get(
            s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="clinician")
        )
        statuses.append(response.status_code)
        if 'class="accounts"' in response.text:  # the first Microsoft sign-in
            link = re.search(
                r'<a class="account[^"]*" data-upn="'
                + re.escape(html.escape(upn))
                + r'"[^>]*href="([^"]+)"',
                response.text,
            )
            assert link, "no account on the picker"
            response = browser.get(html.unescape(link.group(1)))
            statuses.append(response.status_code)
        landing = Landing(response)
        return Outcome("clinician", landing.meeting_id, landing.mode, statuses)
    except Exception as error:  # reported by the test, with the others
        return Outcome("clinician", None, None, statuses, error=repr(error))
    finally:
        browser.close()


def _patient(s: Stack, config: TenantConfig) -> Outcome:
    browser = s.browser()
    statuses: list[int] = []
    try:
        response = browser.get(
            s.sandbox.ehr.launch_url(config.id, appointment_id=SOLO, user="patient")
        )
        statuses.append(response.status_code)
        waited = False
        deadline = time.monotonic() + WAIT_LIMIT
        while Landing(response).meeting_id is None and "will start soon" in response.text:
            waited = True
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)  # the page itself refreshes every 5 s; a test may ask faster
            response = browser.get(f"{s.api}/launch/wait")
            statuses.append(response.status_code)
        landing = Landing(response)
        return Outcome("patient", landing.meeting_id, landing.mode, statuses, waited=waited)
    except Exception as error:
        return Outcome("patient", None, None, statuses, error=repr(error))
    finally:
        browser.close()


# msal's warning filter (warnings.catch_warnings in EntraSignIn) is not thread-safe
@pytest.mark.filterwarnings("ignore:response_mode:UserWarning")
def test_fifty_browsers_launching_one_visit_make_one_meeting_and_one_subscription(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    forget_mapping(s, PRACTITIONER)  # the clinicians' first launch: Microsoft sign-in too
    upn = s.sandbox.entra.user_for_practitioner(PRACTITIONER).upn
    roles = ["clinician"] * CLINICIANS + ["patient"] * PATIENTS
    roles[::5], roles[1::5] = roles[1::5], roles[::5]  # interleave: not all clinicians first
    gate = threading.Barrier(len(roles), timeout=30)

    def run(role: str) -> Outcome:
        gate.wait()  # all start together
        return _clinician(s, config, upn) if role == "clinician" else _patient(s, config)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(roles), thread_name_prefix="browser") as pool:
        outcomes = list(pool.map(run, roles, timeout=120))
    elapsed = time.monotonic() - started

    errors = [(o.role, o.error, o.statuses) for o in outcomes if o.error]
    assert errors == []
    assert all(status < 500 for o in outcomes for status in o.statuses), [
        o.statuses for o in outcomes
    ]
    meetings = Counter(o.meeting_id for o in outcomes)
    assert len(meetings) == 1 and None not in meetings, (meetings, elapsed)
    (meeting_id,) = meetings
    assert {o.mode for o in outcomes if o.role == "patient"} == {"guest"}

    container = s.container()
    key = container.keyring.keyed_hash("visit", config.id, "appointment", SOLO)
    graph = s.sandbox.graph
    assert [m.id for m in list(graph.meetings.values()) if m.external_id == key] == [meeting_id]
    created = subscriptions_when_settled(s, meeting_id)  # the queue worker creates it
    active = [x for x in created if x.active]
    assert len(active) == 1, [(x.id, x.active) for x in created]
    # Only the launch that created the visit asks the worker for the subscription; racing
    # launches of a visit that fresh do not (once, before the queue: one per browser, 50).
    assert len(created) == 1, len(created)
    visit = wait_for(
        lambda: (v := container.visits.get(key).record).subscription_id and v,
        what="the visit's subscription id",
    )
    assert visit.subscription_id == active[0].id and visit.join_web_url
    records = [
        sid
        for sid in container.subscriptions.list_ids()
        if container.subscriptions.get(sid).record.visit_key == key
    ]
    assert records == [active[0].id]
    container.mappings.get(user_key(s, PRACTITIONER))  # one mapping (keyed: cannot be two)


# --- ETags under concurrency ---------------------------------------------------------------------

ADMIN_ROLE = "Connector.Admin"
RACERS = 12


def _token(s: Stack, config: TenantConfig, *, admin: bool) -> str:
    upn = "admin@x.example" if admin else config.approver_upn
    return s.sandbox.entra.mint_access_token(
        tid=config.tenant_id,
        # One person, one object id: the approver is bound to it at their first EHR sign-in.
        oid=str(uuid.uuid5(uuid.NAMESPACE_URL, upn)),
        roles=[ADMIN_ROLE] if admin else [],
        preferred_username=upn,
    )


def _signed_in_pending_config(s: Stack) -> tuple[TenantConfig, str]:
    """A config sent back for approval (PUT), then the approver's EHR sign-in through the
    browser, so an approval is possible; returns it with its current ETag."""
    config = own_config(s)
    admin = _token(s, config, admin=True)
    approver = _token(s, config, admin=False)
    with s.http() as api:
        current = api.get(f"/configs/{config.id}", headers={"Authorization": f"Bearer {admin}"})
        body = {
            "fhirBaseUrl": config.fhir_base_url,
            "approverUpn": config.approver_upn,
            "environment": "production",  # a real change: back to pending_approval
        }
        put = api.put(
            f"/configs/{config.id}",
            json=body,
            headers={"Authorization": f"Bearer {admin}", "If-Match": current.headers["etag"]},
        )
        assert put.status_code == 200 and put.json()["status"] == "pending_approval", put.text
        started = api.post(
            f"/configs/{config.id}/ehr-signin", headers={"Authorization": f"Bearer {approver}"}
        )
        assert started.status_code == 200, started.text
    browser = s.browser()
    page = browser.get(started.json()["authorizeUrl"])
    done = browser.get(find_signin_link(page.text))
    assert done.status_code == 200 and "EHR sign-in complete" in done.text
    with s.http() as api:
        fresh = api.get(f"/configs/{config.id}", headers={"Authorization": f"Bearer {admin}"})
    return config, fresh.headers["etag"]


def test_concurrent_approvals_and_edits_resolve_by_etag(fresh_stack: Stack) -> None:
    s = fresh_stack
    config, etag = _signed_in_pending_config(s)
    try:
        admin = _token(s, config, admin=True)
        approver = _token(s, config, admin=False)
        gate = threading.Barrier(RACERS, timeout=30)

        def race(i: int) -> tuple[str, int, str]:
            with s.http() as api:
                gate.wait()
                if i % 2 == 0:
                    response = api.post(
                        f"/configs/{config.id}/approve",
                        headers={"Authorization": f"Bearer {approver}", "If-Match": etag},
                    )
                    return "approve", response.status_code, response.headers.get("etag", "")
                body = {
                    "fhirBaseUrl": config.fhir_base_url,
                    "approverUpn": config.approver_upn,
                    "environment": "production",
                    "smartClientId": f"racer-{i}",  # a real edit; the approver stays
                }
                response = api.put(
                    f"/configs/{config.id}",
                    json=body,
                    headers={"Authorization": f"Bearer {admin}", "If-Match": etag},
                )
                return f"put{i}", response.status_code, response.headers.get("etag", "")

        with ThreadPoolExecutor(max_workers=RACERS) as pool:
            results = list(pool.map(race, range(RACERS), timeout=60))
        statuses = Counter(status for _, status, _ in results)
        assert statuses == {200: 1, 412: RACERS - 1}, results
        (winner,) = [r for r in results if r[1] == 200]

        with s.http() as api:
            final = api.get(f"/configs/{config.id}", headers={"Authorization": f"Bearer {admin}"})
            history = api.get(
                f"/configs/{config.id}/history", headers={"Authorization": f"Bearer {admin}"}
            ).json()
        assert final.headers["etag"] == winner[2]
        stored = final.json()
        if winner[0] == "approve":
            assert stored["status"] == "approved"
            assert stored["approverUpn"] == config.approver_upn
        else:
            i = int(winner[0][3:])
            assert stored["smartClientId"] == f"racer-{i}"
            assert stored["status"] == "pending_approval"
        # the audit trail records the winner's change once, and no loser's
        actions = [h["action"] for h in history]
        last_signin = len(actions) - 1 - actions[::-1].index("ehr_signin")
        assert actions[last_signin + 1 :] == ["approved" if winner[0] == "approve" else "updated"]

        # a second round against the new ETag: again exactly one of several edits wins
        def edit(i: int) -> int:
            body = {
                "fhirBaseUrl": config.fhir_base_url,
                "approverUpn": f"second{i}@x.example",
                "environment": "test",
            }
            with s.http() as api:
                return api.put(
                    f"/configs/{config.id}",
                    json=body,
                    headers={"Authorization": f"Bearer {admin}", "If-Match": winner[2]},
                ).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            second = Counter(pool.map(edit, range(8), timeout=60))
        assert second == {200: 1, 412: 7}
    finally:
        drop_config(s, config)
