"""CONNECTOR_SECRET_KEY rotation in the middle of a live visit, through the local host (issue 14,
item 2; docs/design.md section 4).

* ``test_rotating_keys_mid_visit_keeps_the_visit_going``: a visit is live (clinician signed in
  once, meeting, subscription, patient in, write-backs landed). The connector restarts with
  ``[new, old]``: the clinician goes straight in (no second sign-in) to the same meeting, the
  patient reaches the same meeting, Graph's notifications for the subscription made before
  (its clientState sealed by the old key) and for one made after (sealed by the new key) are
  accepted, the write-backs land. Then ``[new]`` alone: identifiers are still the same.
* ``test_instances_on_old_and_new_key_lists_accept_each_others_state``: two instances at once
  (this process and a second ``devtools.host`` process, same storage and public URL), as during
  the minutes an app setting takes to reach every instance. Staged ``[old, new]`` and promoted
  ``[new, old]`` accept each other's launch state, visit cookie and subscription secrets in both
  directions. An instance that never listed the new key refuses new state clearly: a launch
  page that says to start again, and a 503 for Graph (which delivers again) rather than a
  silently dropped notification.
"""

from __future__ import annotations

import base64
import html
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from connector_core.bootstrap import reset_container
from connector_core.crypto import key_id, sealed_key_id
from connector_core.domain.models import TenantConfig
from connector_core.errors import UnknownKeyError
from devtools._serve import free_port
from devtools.sandbox import seed
from tests.e2e.launch.helpers import (
    Landing,
    clinician_launch,
    forget_mapping,
    patient_launch,
    user_key,
)
from tests.e2e.presence._flow import APPOINTMENT, LiveVisit, launch_visit, wait_for
from tests.stack import Browser, Stack

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTING = "CONNECTOR_SECRET_KEY"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def first_key_id(value: str) -> str:
    return key_id(base64.b64decode(value.split(",")[0]))


@contextmanager
def restarted_with(value: str, *, after: str) -> Iterator[None]:
    """This process's connector instance restarted with ``CONNECTOR_SECRET_KEY=value`` (as an
    instance picking up a new Key Vault secret version), then with ``after``."""
    os.environ[SETTING] = value
    reset_container()
    try:
        yield
    finally:
        os.environ[SETTING] = after
        reset_container()


class SecondInstance:
    """Another connector instance in its own process behind the same public URL and storage
    (``python -m devtools.host --no-triggers``): HTTP only, so queue work stays with this
    process's instance and the test decides which instance serves each request."""

    def __init__(self, stack: Stack, secret_key: str) -> None:
        self.stack = stack
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret_key = secret_key
        self._log = tempfile.NamedTemporaryFile(prefix="second-instance-", suffix=".log")  # noqa: SIM115
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SecondInstance:
        env = {**os.environ, SETTING: self.secret_key, "PYTHONPATH": str(REPO_ROOT)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.host", "--port", str(self.port), "--no-triggers"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"second instance did not start:\n{self.output()}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    def at(self, url: str) -> str:
        """``url`` served by this instance instead of the one at the public URL."""
        assert url.startswith(self.stack.url), url
        return self.url + url[len(self.stack.url) :]


def walk(browser: Browser, url: str, route: Callable[[str], str]) -> Landing:
    """Follow redirects one hop at a time; ``route`` picks the instance for connector URLs."""
    for _ in range(20):
        response = browser.get(route(url))
        if response.status_code not in (301, 302, 303, 307, 308):
            return Landing(response)
        url = urljoin(str(response.url), response.headers["location"])
    raise AssertionError("too many redirects")


def starts_on(instance: SecondInstance) -> Callable[[str], str]:
    """Route the EHR's launch (the first hop) to ``instance``, the rest to the public URL."""

    def route(url: str) -> str:
        launch = "/api/launch/provider/" in url or "/api/launch/patient/" in url
        return instance.at(url) if launch else url

    return route


def callbacks_on(instance: SecondInstance) -> Callable[[str], str]:
    """Route the EHR's answer (``/api/launch/callback``) to ``instance``."""

    def route(url: str) -> str:
        return instance.at(url) if "/api/launch/callback" in url else url

    return route


def hop_browser(stack: Stack) -> Browser:
    return Browser(ca_bundle=str(stack.sandbox.ca_bundle), follow_redirects=False)


def launch_url(
    stack: Stack, config: TenantConfig, user: str, appointment: str = APPOINTMENT
) -> str:
    return str(
        stack.sandbox.ehr.launch_url(config.id, appointment_id=appointment, user=user)  # type: ignore[arg-type]
    )


def config_of(stack: Stack, live: LiveVisit) -> TenantConfig:
    return stack.container().configs.get(stack.tenant(0).tid, live.config_id).record


def live_visit_before_rotation(stack: Stack) -> tuple[LiveVisit, TenantConfig, list[str]]:
    """A visit under the current keys: the clinician signs in the first time, both join."""
    practitioner = seed.APPOINTMENTS[APPOINTMENT].practitioner_id
    forget_mapping(stack, practitioner)
    signins = stack.logs.text().count("launch.entra_signin")
    live = launch_visit(stack)  # through the Entra account picker: no mapping yet
    assert stack.logs.text().count("launch.entra_signin") == signins + 1
    assert stack.container().mappings.get(user_key(stack, practitioner)).record.entra_oid
    people = [live.join_clinician(), live.join_patient()]
    live.wait_audit_events(2)
    return live, config_of(stack, live), people


def subscription_record(stack: Stack, subscription_id: str) -> Any:
    return wait_for(
        lambda: _maybe_record(stack, subscription_id), what=f"subscription {subscription_id}"
    )


def _maybe_record(stack: Stack, subscription_id: str) -> Any:
    from connector_core.errors import NotFoundError

    try:
        return stack.container().subscriptions.get(subscription_id).record
    except NotFoundError:
        return None


def resubscribe(stack: Stack, live: LiveVisit) -> Any:
    """Graph removes the meeting's subscription; the connector makes a new one (its queue
    worker, in this process). Returns the new sandbox subscription."""
    old = live.subscription()
    live.graph.send_lifecycle(old.id, "subscriptionRemoved")
    return wait_for(
        lambda: next(
            (
                s
                for s in live.graph.subscriptions_for(live.meeting.id)
                if s.active and s.id != old.id
            ),
            None,
        ),
        what="the new subscription",
    )


def dropped(stack: Stack) -> int:
    return stack.logs.text().count("presence.notification.dropped")


def test_rotating_keys_mid_visit_keeps_the_visit_going(fresh_stack: Stack) -> None:
    s = fresh_stack
    old = os.environ[SETTING]
    new = new_key()
    live, config, (doctor, patient) = live_visit_before_rotation(s)
    before = s.container().subscriptions.get(live.subscription().id).record
    assert sealed_key_id(before.client_state_sealed) == first_key_id(old)
    mapping_key = s.container().keyring.keyed_hash(
        "ehr-user",
        config.fhir_base_url,
        f"Practitioner/{seed.APPOINTMENTS[APPOINTMENT].practitioner_id}",
    )
    drops = dropped(s)

    with restarted_with(f"{new},{old}", after=f"{new},{old}"):
        keyring = s.container().keyring
        assert keyring.active_key_id == key_id(base64.b64decode(new))
        # Identifiers did not move: the same visit key (Graph externalId) and EHR user key.
        assert keyring.keyed_hash("visit", config.id, "appointment", APPOINTMENT) == live.visit_key
        assert (
            keyring.keyed_hash(
                "ehr-user",
                config.fhir_base_url,
                f"Practitioner/{seed.APPOINTMENTS[APPOINTMENT].practitioner_id}",
            )
            == mapping_key
        )
        # The clinician goes straight in, to the same meeting; so does the patient.
        again = clinician_launch(s, s.browser(), config, APPOINTMENT, expect_signin=False)
        assert again.meeting_id == live.meeting.id
        assert patient_launch(s, s.browser(), config, APPOINTMENT).meeting_id == live.meeting.id
        assert [m.id for m in live.graph.meetings.values() if m.external_id == live.visit_key] == [
            live.meeting.id
        ]
        # Notifications of the subscription made before the rotation keep being accepted ...
        live.leave(patient)
        patient = live.join_patient()
        live.wait_audit_events(4)
        # ... and a subscription made now carries a secret sealed by the new key.
        fresh_sub = resubscribe(s, live)
        record = subscription_record(s, fresh_sub.id)
        assert sealed_key_id(record.client_state_sealed) == key_id(base64.b64decode(new))
        live.leave(patient)
        live.leave(doctor)
        events = live.wait_audit_events(6)
        assert (
            sorted(e["subtype"][1]["code"] for e in events) == ["connect"] * 3 + ["disconnect"] * 3
        )
        live.graph.wait_idle()
        notes = [d for d in live.graph.deliveries if d.kind == "notification" and d.done]
        assert notes and all(d.status == 202 for d in notes[-4:]), [d.status for d in notes]
        assert dropped(s) == drops

    # The old key retired: identifiers still the same, the clinician still goes straight in.
    with restarted_with(new, after=f"{new},{old}"):
        keyring = s.container().keyring
        assert keyring.key_ids == (key_id(base64.b64decode(new)),)
        assert keyring.keyed_hash("visit", config.id, "appointment", APPOINTMENT) == live.visit_key
        landing = clinician_launch(s, s.browser(), config, APPOINTMENT, expect_signin=False)
        assert landing.meeting_id == live.meeting.id
        # What only the old key sealed (this visit's EHR references, from its first launch)
        # no longer opens: why the runbook keeps the old key until the retention period ends.
        sealed = live.visit().sealed_context
        assert sealed_key_id(sealed) == first_key_id(old)
        with pytest.raises(UnknownKeyError):
            keyring.unseal("visit-context", sealed)
    # The operator's check before retiring a key sees both keys still in use in storage.
    from collections import Counter

    from devtools.key_usage import table_service, usage

    in_use: Counter[str] = Counter()
    for counts in usage(table_service(s.azurite.connection_string, None), "americas").values():
        in_use.update(counts)
    assert in_use[first_key_id(old)] >= 1 and in_use[key_id(base64.b64decode(new))] >= 2


def test_instances_on_old_and_new_key_lists_accept_each_others_state(fresh_stack: Stack) -> None:
    s = fresh_stack
    current = os.environ[SETTING]
    new = new_key()
    staged, promoted = f"{current},{new}", f"{new},{current}"
    live, config, people = live_visit_before_rotation(s)
    with restarted_with(promoted, after=promoted), SecondInstance(s, staged) as other:
        on_other = other.at
        # Launch state sealed by the staged instance (old key), opened by the promoted one ...
        landed = walk(hop_browser(s), launch_url(s, config, "clinician"), starts_on(other))
        assert landed.meeting_id == live.meeting.id, landed.response.text[:300]
        # ... and sealed by the promoted instance (new key), opened by the staged one.
        browser = hop_browser(s)
        landed = walk(browser, launch_url(s, config, "clinician"), callbacks_on(other))
        assert landed.meeting_id == live.meeting.id, landed.response.text[:300]
        patient = walk(hop_browser(s), launch_url(s, config, "patient"), callbacks_on(other))
        assert patient.meeting_id == live.meeting.id, patient.response.text[:300]
        # The clinician's visit cookie, sealed by one instance, opens on the other.
        cookie = next(c.value for c in browser.jar if c.name.endswith("vv-visit"))
        assert sealed_key_id(cookie) == first_key_id(current)  # sealed by the staged instance
        view = httpx.get(
            f"{s.api}/visits/{live.visit_key}/participants?format=json",
            headers={"Cookie": f"__Host-vv-visit={cookie}"},
            timeout=10,
        )
        assert view.status_code == 200, view.text

        # A subscription made by the promoted instance: its secret is sealed by the new key.
        fresh_sub = resubscribe(s, live)
        record = subscription_record(s, fresh_sub.id)
        assert sealed_key_id(record.client_state_sealed) == key_id(base64.b64decode(new))
        # Graph delivers its notifications to the staged instance: accepted, written back.
        public_url = fresh_sub.notification_url
        fresh_sub.notification_url = on_other(public_url)
        try:
            joined = live.join_patient()
            delivery = live.graph.wait_for(
                lambda d: d.subscription_id == fresh_sub.id and d.kind == "notification"
            )[-1]
            assert delivery.status == 202, delivery.response_text
            live.wait_audit_events(3)
        finally:
            fresh_sub.notification_url = public_url

    # An instance that never listed the new key (still on the old list) during a one-step
    # rotation: it opens what the old key sealed, and refuses the new key's state clearly.
    with restarted_with(promoted, after=promoted), SecondInstance(s, current) as stale:
        ok = walk(
            hop_browser(s),
            launch_url(s, config, "clinician"),
            starts_on(stale),
        )
        assert ok.meeting_id == live.meeting.id  # old-key state opened by the promoted instance
        refused = walk(
            hop_browser(s),
            launch_url(s, config, "clinician"),
            callbacks_on(stale),
        )
        assert refused.response.status_code == 401, refused.response.text[:300]
        assert "correlation" in html.unescape(refused.response.text).lower()
        # Graph's notification reaches the stale instance: 503, so Graph delivers it again,
        # never a 202 that drops it.
        drops = dropped(s)
        public_url = fresh_sub.notification_url
        fresh_sub.notification_url = stale.at(public_url)
        try:
            live.leave(joined)
            delivery = live.graph.wait_for(
                lambda d: (
                    d.subscription_id == fresh_sub.id
                    and d.kind == "notification"
                    and d.status == 503
                ),
                timeout=20,
            )[-1]
            assert "key" in (delivery.response_text or "").lower()
        finally:
            fresh_sub.notification_url = public_url
        assert dropped(s) == drops
        # Delivered again (to an instance with the new key): accepted and written back.
        again = live.graph.send_raw(fresh_sub.id, delivery.body)
        live.graph.wait_idle()
        assert again.status == 202
        live.wait_audit_events(4)
        for person in people:
            live.leave(person)
