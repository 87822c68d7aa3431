"""Fakes and builders for the presence unit tests: an EHR writer that behaves like a FHIR server
(conditional create by identifier, search, failures before or after storing), a Graph client,
a clock, and notification builders."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from connector_core.adapters.memory import InMemoryEntityStore, InMemoryMessageQueue
from connector_core.bootstrap import Container, reset_container, set_container
from connector_core.domain.models import (
    EhrVendor,
    Environment,
    GraphSubscription,
    Region,
    TenantConfig,
    Visit,
)
from connector_core.domain.presence import WritebackOutcome
from connector_core.errors import EhrError, GraphError
from connector_core.queues import PRESENCE_POISON_QUEUE, PRESENCE_QUEUE
from connector_core.service.presence import accept_notifications, process_message
from devtools.sandbox._notify import encrypt_rich_notification
from tests.helpers import in_memory_container

POISON_QUEUE = PRESENCE_POISON_QUEUE
TENANT = "85045508-f5bd-405e-a553-52700f86e29c"
ORGANIZER = "f92ca67f-0564-414b-8caa-8c95b8099928"
STAFF_OID = "0b3e2c1d-0000-4000-8000-000000000002"
VISIT_KEY = "a" * 32
SUB_ID = "7f105c7d-2dc5-4530-97cd-4e7ae6534c07"
SECRET = "s3cret-client+state/=="
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
WRITEBACK_SYSTEM = "urn:ehr-virtual-visit:writeback"


def writeback_key_of(resource: dict[str, Any]) -> str:
    for entity in resource.get("entity", []):
        identifier = entity.get("what", {}).get("identifier", {})
        if identifier.get("system") == WRITEBACK_SYSTEM:
            return str(identifier["value"])
    raise AssertionError("the AuditEvent carries no write-back identifier")


class FakeWriter:
    """Stands in for EhrWriter as a FHIR server would answer it: a conditional create
    (``writeback_key``) finds an AuditEvent stored before (unless ``honours_if_none_exist`` is
    off, as in servers without conditional create), ``find_audit_event`` searches by the
    identifier. Failures: ``fail_audit`` (503, nothing stored), ``store_then_timeout`` (stored,
    then the answer is lost: a timeout), ``reject_permanent`` (400), ``reject_audit`` /
    ``reject_epic`` (the token refused), ``fail_epic``; ``before_store`` runs inside a POST."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock
        self.audit_events: list[dict[str, Any]] = []  # every stored resource, duplicates too
        self.stored: dict[str, dict[str, Any]] = {}
        self.posts: list[str] = []  # write-back key of every POST attempt
        self.conditional: list[bool] = []  # whether each POST was conditional
        self.searches: list[str] = []
        self.epic_calls: list[dict[str, Any]] = []
        self.tokens: list[tuple[str, str, str]] = []
        self.token_options: list[dict[str, Any]] = []  # allowed_hosts, fresh, per token fetch
        self.used_tokens: list[str] = []  # the token each EHR call carried
        self.honours_if_none_exist = True
        # What its CapabilityStatement says (AuditEvent conditionalCreate).
        self.advertises_conditional_create = True
        self.capability_reads = 0
        self.fail_audit = 0
        self.store_then_timeout = 0
        self.reject_permanent = 0
        self.fail_epic = 0
        self.reject_audit = 0
        self.reject_epic = 0
        self.refuse_search = False
        self.before_store: Callable[[str], None] | None = None
        self.after_store: Callable[[str], None] | None = None
        self.lock = threading.RLock()

    def backend_token(
        self, fhir_base_url: str, *, client_id: str, scope: str, **options: Any
    ) -> str:
        self.tokens.append((fhir_base_url, client_id, scope))
        self.token_options.append(options)
        return f"token-{len(self.tokens)}"

    def conditional_create_supported(self, fhir_base_url: str) -> bool:
        self.capability_reads += 1
        return self.advertises_conditional_create

    def _rejected(self) -> EhrError:
        return EhrError(
            "The EHR answered 401 to the call.",
            ehrStatus=401,
            reason="token_rejected",
            sent=False,
            permanent=False,
        )

    def post_audit_event(
        self,
        fhir_base_url: str,
        resource: dict[str, Any],
        *,
        token: str,
        writeback_key: str | None = None,
    ) -> WritebackOutcome:
        key = writeback_key_of(resource)
        hook = self.before_store
        if hook is not None:
            hook(key)
        with self.lock:
            self.used_tokens.append(token)
            self.posts.append(key)
            self.conditional.append(writeback_key is not None)
            if self.reject_audit:
                self.reject_audit -= 1
                raise self._rejected()
            if self.fail_audit:
                self.fail_audit -= 1
                raise EhrError(
                    "The EHR answered 503 to the AuditEvent.",
                    ehrStatus=503,
                    sent=False,
                    permanent=False,
                )
            if self.reject_permanent:
                self.reject_permanent -= 1
                raise EhrError(
                    "The EHR answered 400 to the AuditEvent.",
                    ehrStatus=400,
                    sent=False,
                    permanent=True,
                )
            if writeback_key is not None and self.honours_if_none_exist and key in self.stored:
                return WritebackOutcome.EXISTED
            self.stored.setdefault(key, resource)
            self.audit_events.append(resource)
            after = self.after_store
            if after is not None:
                after(key)
            if self.store_then_timeout:
                self.store_then_timeout -= 1
                raise EhrError(
                    "The EHR could not be reached for the AuditEvent (ReadTimeout).",
                    ehrStatus=None,
                    sent=True,
                    permanent=False,
                )
            return WritebackOutcome.CREATED

    def find_audit_event(self, fhir_base_url: str, *, token: str, writeback_key: str) -> bool:
        with self.lock:
            self.searches.append(writeback_key)
            if self.refuse_search:
                raise EhrError(
                    "The EHR answered 403 to the search.",
                    ehrStatus=403,
                    sent=False,
                    permanent=False,
                )
            return writeback_key in self.stored

    def set_epic_connection_status(self, fhir_base_url: str, **kw: Any) -> None:
        with self.lock:
            self.used_tokens.append(kw["token"])
            if self.reject_epic:
                self.reject_epic -= 1
                raise self._rejected()
            if self.fail_epic:
                self.fail_epic -= 1
                raise EhrError("The EHR answered 500 to the Epic connection status.", ehrStatus=500)
            self.epic_calls.append(kw)


class FakeGraph:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.created = 0

    def _call(self, name: str, subscription_id: str) -> None:
        self.calls.append((name, subscription_id))
        if name in self.fail:
            raise GraphError(f"Microsoft Graph failed the {name}.")

    def reauthorize_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        self._call("reauthorize", subscription_id)

    def renew_subscription(
        self, *, tenant_id: str, subscription_id: str, expires_at: datetime
    ) -> datetime:
        self._call("renew", subscription_id)
        return expires_at

    def delete_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        self._call("delete", subscription_id)

    def create_subscription(
        self, *, tenant_id: str, join_web_url: str, client_state: str, expires_at: datetime
    ) -> tuple[str, datetime]:
        self.created += 1
        new_id = f"new-sub-{self.created}"
        self._call("create", new_id)
        return new_id, expires_at


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += timedelta(seconds=seconds)


def make_container(*, vendor: EhrVendor = EhrVendor.SMART, context: bool = True) -> Container:
    container = in_memory_container()
    clock = Clock(T0)
    container.clock = clock
    container.ehr_writer = FakeWriter(clock)  # type: ignore[assignment]
    container.graph = FakeGraph()  # type: ignore[assignment]
    container.presence.options.retry_delays = (1, 2)
    config = TenantConfig(
        id="cfg-1",
        tenant_id=TENANT,
        region=Region.AMERICAS,
        fhir_base_url="https://ehr.example/api/FHIR/R4",
        approver_upn="analyst@contoso.example",
        environment=Environment.TEST,
        ehr_vendor=vendor,
        created_at=T0,
        created_by="admin",
        updated_at=T0,
    )
    container.configs.add(config)
    sealed = None
    if context:
        sealed = container.keyring.seal(
            "visit-context",
            {
                "fhir_base_url": config.fhir_base_url,
                "practitioner": "Practitioner/prac-77",
                "patient": "Patient/pat-42",
                "appointment": "Appointment/appt-9",
                "encounter": "Encounter/enc-5",
                "conference_id": None,
            },
        )
    add_visit(container, VISIT_KEY, SUB_ID, SECRET, sealed=sealed, config_id=config.id)
    return container


@pytest.fixture(name="container")
def container_fixture() -> Iterator[Container]:
    """``make_container()`` installed as the composition root for one test (import this into a
    test module to get the ``container`` fixture)."""
    c = make_container()
    set_container(c)
    yield c
    reset_container()


def add_visit(
    container: Container,
    visit_key: str,
    subscription_id: str,
    secret: str,
    *,
    sealed: str | None,
    config_id: str = "cfg-1",
) -> None:
    container.visits.create(
        Visit(
            visit_key=visit_key,
            region=Region.AMERICAS,
            config_id=config_id,
            tenant_id=TENANT,
            meeting_id="m1",
            join_web_url="https://teams.example/l/meetup-join/x",
            organizer_oid=ORGANIZER,
            subscription_id=subscription_id,
            subscription_expires_at=T0 + timedelta(days=2),
            sealed_context=sealed,
            created_at=T0,
            updated_at=T0,
        )
    )
    container.subscriptions.upsert(
        GraphSubscription(
            subscription_id=subscription_id,
            region=Region.AMERICAS,
            visit_key=visit_key,
            tenant_id=TENANT,
            client_state_sealed=container.keyring.seal("client-state", {"clientState": secret}),
            expires_at=T0 + timedelta(days=2),
            created_at=T0,
        )
    )


def cert_of(container: Container) -> x509.Certificate:
    pem = container.settings.graph_notification_cert.get_secret_value()
    return x509.load_pem_x509_certificate(pem.encode())


def user(pid: str, oid: str) -> dict[str, Any]:
    return {
        "id": pid,
        "identity": {"User": {"Id": oid, "DisplayName": "Dr Name", "TenantId": TENANT}},
    }


def guest(pid: str) -> dict[str, Any]:
    return {"id": pid, "identity": {"Guest": {"Id": pid, "DisplayName": "Patient Name"}}}


def roster_event(
    seconds: float,
    joined: list[dict[str, Any]] = (),  # type: ignore[assignment]
    exited: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    at = T0 + timedelta(seconds=seconds)
    return {
        "@odata.type": "#Microsoft.Graph.onlineMeeting",
        "id": "communications/onlineMeetings?$filter=joinWebUrl+eq+'x'",
        "eventType": "Microsoft.Communication.CallRosterUpdate",
        "eventDateTime": at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
        "activeParticipants@joined": list(joined),
        "activeParticipants@exited": list(exited),
    }


def call_event(kind: str, seconds: float) -> dict[str, Any]:
    at = T0 + timedelta(seconds=seconds)
    return {
        "eventType": f"Microsoft.Communication.{kind}",
        "eventDateTime": at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
    }


def item(
    container: Container,
    event: dict[str, Any],
    *,
    secret: str = SECRET,
    encrypted: bool = True,
    subscription_id: str = SUB_ID,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subscriptionId": subscription_id,
        "clientState": secret,
        "changeType": "updated",
        "tenantId": TENANT,
        "resource": event.get("id", "x"),
        "resourceData": {"@odata.type": "#microsoft.graph.onlineMeeting", "id": "x"},
    }
    if encrypted:
        body["encryptedContent"] = encrypt_rich_notification(event, cert_of(container), "c1")
    else:
        body["resourceData"].update(event)
    return body


def queue_of(container: Container) -> InMemoryMessageQueue:
    queue = container.queue
    assert isinstance(queue, InMemoryMessageQueue)
    return queue


def store_of(container: Container) -> InMemoryEntityStore:
    store = container.store
    assert isinstance(store, InMemoryEntityStore)
    return store


def queued(container: Container, name: str = PRESENCE_QUEUE) -> list[str]:
    return list(queue_of(container).queues[name])


def drain(container: Container, *, rounds: int = 200) -> int:
    """Process presence-events until empty (retries included); returns messages processed."""
    queue = queue_of(container)
    processed = 0
    for _ in range(rounds):
        if not queue.queues[PRESENCE_QUEUE]:
            break
        body = queue.queues[PRESENCE_QUEUE].popleft()
        process_message(container, body)
        processed += 1
    return processed


def deliver(container: Container, *events: dict[str, Any]) -> None:
    accept_notifications(container, {"value": [item(container, e) for e in events]})
    drain(container)


def writer(container: Container) -> FakeWriter:
    w = container.ehr_writer
    assert isinstance(w, FakeWriter)
    return w


def fake_graph(container: Container) -> FakeGraph:
    g = container.graph
    assert isinstance(g, FakeGraph)
    return g


def clock_of(container: Container) -> Clock:
    c = container.clock
    assert isinstance(c, Clock)
    return c
