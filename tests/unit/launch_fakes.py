"""Fakes of the launch adapters (SMART, Graph, Entra sign-in) and helpers to drive the service."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from connector_core.adapters.entra_signin import EntraUser
from connector_core.adapters.graph import OnlineMeeting
from connector_core.adapters.smart import SmartClient, SmartConfiguration, SmartTokenResponse
from connector_core.bootstrap import Container
from connector_core.domain.models import (
    ConfigStatus,
    EhrUserMapping,
    Environment,
    ProviderLanding,
    TenantConfig,
    utcnow,
)
from connector_core.domain.visit_keys import CONFERENCE_ID_SYSTEM, ehr_user_key
from connector_core.errors import ConnectorError
from connector_core.service.launch import LaunchResult, LaunchRole, complete_launch, start_launch
from tests.helpers import in_memory_container

FHIR = "https://ehr.example/fhir/r4"
AS_ISSUER = "https://ehr.example/oauth2"  # the authorization server, not the FHIR base
TENANT = "3f8d2a6b-5c1e-4b7a-9e2d-7a41c0b8e915"
ORGANIZER = "11111111-2222-3333-4444-555555555555"
PRACTITIONER = "Practitioner/prac-secret-1"
PATIENT_ID = "pat-secret-1"
APPOINTMENT_ID = "appt-secret-1"
ENCOUNTER_ID = "enc-secret-1"
SENSITIVE = [PRACTITIONER.split("/")[1], PATIENT_ID, APPOINTMENT_ID, ENCOUNTER_ID]


class FakeSmart:
    def __init__(self) -> None:
        self.discoveries = 0
        self.exchanges: list[dict[str, Any]] = []
        self.reads: list[str] = []
        self.fhir_user: str | None = f"{FHIR}/{PRACTITIONER}"
        self.context: dict[str, Any] = {
            "patient": PATIENT_ID,
            "encounter": ENCOUNTER_ID,
            "fhirContext": [{"reference": f"Appointment/{APPOINTMENT_ID}"}],
        }
        self.exchange_error: ConnectorError | None = None
        self.appointment_practitioners = [PRACTITIONER]
        self.s256 = True
        # Epic-shaped discovery: the authorization server's issuer is not the FHIR base URL,
        # and it always sends iss on authorization responses (RFC 9207).
        self.issuer: str | None = AS_ISSUER
        self.iss_supported = True
        self.allowed_hosts: tuple[str, ...] = ()

    def get_configuration(
        self, fhir_base_url: str, *, allowed_hosts: Iterable[str] = ()
    ) -> SmartConfiguration:
        self.discoveries += 1
        self.allowed_hosts = tuple(allowed_hosts)
        return SmartConfiguration(
            fhir_base_url=fhir_base_url.rstrip("/"),
            issuer=self.issuer,
            authorization_response_iss_parameter_supported=self.iss_supported,
            authorization_endpoint="https://ehr.example/oauth2/authorize",
            token_endpoint="https://ehr.example/oauth2/token",
            jwks_uri="https://ehr.example/jwks",
            code_challenge_methods_supported=("S256",) if self.s256 else ("plain",),
            token_endpoint_auth_methods_supported=("private_key_jwt",),
            token_endpoint_auth_signing_alg_values_supported=("RS384",),
            capabilities=(),
            grant_types_supported=(),
        )

    def build_authorize_url(self, smart: SmartConfiguration, **kwargs: Any) -> str:
        return SmartClient.build_authorize_url(self, smart, **kwargs)  # type: ignore[arg-type]

    def exchange_code(self, smart: SmartConfiguration, **kwargs: Any) -> SmartTokenResponse:
        self.exchanges.append(kwargs)
        if self.exchange_error is not None:
            raise self.exchange_error
        return SmartTokenResponse.from_body(
            {"access_token": "at", "token_type": "Bearer", "id_token": "idt", **self.context}
        )

    def validate_id_token(
        self, smart: SmartConfiguration, id_token: str, *, client_id: str, nonce: str
    ) -> dict[str, Any]:
        return {"sub": "x", "fhirUser": self.fhir_user} if self.fhir_user else {"sub": "x"}

    def read_resource(self, base: str, reference: str, *, access_token: str) -> dict[str, Any]:
        self.reads.append(reference)
        return {
            "resourceType": "Appointment",
            "id": APPOINTMENT_ID,
            "status": "booked",
            "participant": [
                {"actor": {"reference": f"Patient/{PATIENT_ID}"}, "status": "accepted"},
                *(
                    {
                        "type": [{"coding": [{"code": "PPRF"}]}],
                        "actor": {"reference": ref},
                        "status": "accepted",
                    }
                    for ref in self.appointment_practitioners
                ),
            ],
        }


class FakeGraph:
    def __init__(self) -> None:
        self.meetings: dict[tuple[str, str], OnlineMeeting] = {}
        self.calls: list[str] = []
        self.meeting_error: ConnectorError | None = None
        self.subscription_error: ConnectorError | None = None
        self.subscriptions: dict[str, str] = {}  # id -> client state
        self.deleted: list[str] = []

    def create_or_get_meeting(
        self,
        *,
        tenant_id: str,
        organizer_oid: str,
        external_id: str,
        subject: str,
        start: datetime,
        end: datetime,
    ) -> OnlineMeeting:
        self.calls.append("createOrGet")
        assert subject == "Virtual visit"
        if self.meeting_error is not None:
            raise self.meeting_error
        key = (organizer_oid, external_id)
        if key in self.meetings:
            return OnlineMeeting(self.meetings[key].id, self.meetings[key].join_web_url, False)
        meeting = OnlineMeeting(
            id=uuid.uuid4().hex,
            join_web_url=f"https://teams.example/l/meetup-join/{uuid.uuid4().hex}/0?context=x",
            created=True,
        )
        self.meetings[key] = meeting
        return meeting

    def create_subscription(
        self, *, tenant_id: str, join_web_url: str, client_state: str, expires_at: datetime
    ) -> tuple[str, datetime]:
        self.calls.append("subscription")
        if self.subscription_error is not None:
            raise self.subscription_error
        sub_id = uuid.uuid4().hex
        self.subscriptions[sub_id] = client_state
        return sub_id, expires_at

    def delete_subscription(self, *, tenant_id: str, subscription_id: str) -> None:
        self.deleted.append(subscription_id)


class FakeEntra:
    def __init__(self) -> None:
        self.started = 0
        self.user = EntraUser(oid=ORGANIZER, tid=TENANT)
        self.error: ConnectorError | None = None

    def start(self, *, tenant_id: str, redirect_uri: str) -> tuple[str, dict[str, Any]]:
        self.started += 1
        state = uuid.uuid4().hex
        return (
            f"https://login.example/{tenant_id}/oauth2/v2.0/authorize?state={state}",
            {"state": state, "code_verifier": "v", "nonce": "n", "redirect_uri": redirect_uri},
        )

    def complete(
        self, *, tenant_id: str, flow: dict[str, Any], auth_response: dict[str, str]
    ) -> EntraUser:
        if self.error is not None:
            raise self.error
        return self.user


@dataclass
class World:
    container: Container
    smart: FakeSmart
    graph: FakeGraph
    entra: FakeEntra
    config: TenantConfig
    jar: dict[str, str] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        return int(self.container.store.operations)  # type: ignore[attr-defined]

    def apply(self, result: LaunchResult) -> LaunchResult:
        for cookie in result.cookies:
            if cookie.max_age == 0:
                self.jar.pop(cookie.name, None)
            else:
                self.jar[cookie.name] = cookie.value
        return result

    def start(
        self,
        role: LaunchRole = LaunchRole.PROVIDER,
        *,
        iss: str = FHIR,
        launch: str = "L",
        session_id: str | None = None,
    ) -> LaunchResult:
        return self.apply(
            start_launch(
                self.container,
                role=role,
                config_id=self.config.id,
                iss=iss,
                launch=launch,
                session_id=session_id,
            )
        )

    def callback(self, state: str, **query: str | None) -> LaunchResult:
        """The EHR's answer; by default as the EHR answers, with RFC 9207 ``iss`` (the
        authorization server's issuer). A ``None`` value leaves that parameter out."""
        sent = {"state": state, "code": "c", "iss": AS_ISSUER, **query}
        return self.apply(
            complete_launch(
                self.container,
                query={k: v for k, v in sent.items() if v is not None},
                cookies=self.jar,
            )
        )

    def run_subscription_worker(self, limit: int | None = None) -> int:
        """Process what launches put on the ``meeting-subscriptions`` queue (as the queue
        worker does after the launch answered; delays are not simulated), at most ``limit``
        messages; returns the number processed."""
        from connector_core.service.subscriptions import (
            SUBSCRIPTION_QUEUE,
            process_subscription_message,
        )

        queue = self.container.queue.queues[SUBSCRIPTION_QUEUE]  # type: ignore[attr-defined]
        count = 0
        while queue and (limit is None or count < limit):
            process_subscription_message(self.container, queue.popleft())
            count += 1
        return count

    def launch(self, role: LaunchRole = LaunchRole.PROVIDER) -> LaunchResult:
        return self.callback(state_of(self.start(role)))

    def map_clinician(self, practitioner: str = PRACTITIONER, oid: str = ORGANIZER) -> None:
        now = utcnow()
        self.container.mappings.upsert(
            EhrUserMapping(
                ehr_user_key=ehr_user_key(self.container.keyring, FHIR, practitioner),
                region=self.container.settings.region,
                tenant_id=TENANT,
                entra_oid=oid,
                entra_tid=TENANT,
                created_at=now,
                last_used_at=now,
            )
        )

    def use_conference(self, conference_id: str = "conf-secret-1") -> None:
        self.smart.context["fhirContext"] = [
            {"reference": f"Appointment/{APPOINTMENT_ID}"},
            {"identifier": {"system": CONFERENCE_ID_SYSTEM, "value": conference_id}},
        ]


def state_of(result: LaunchResult) -> str:
    assert result.redirect is not None
    return parse_qs(urlsplit(result.redirect).query)["state"][0]


def make_world(
    *,
    status: ConfigStatus = ConfigStatus.APPROVED,
    landing: ProviderLanding = ProviderLanding.MEETING,  # these tests predate the visit page
) -> World:
    container = in_memory_container()
    smart, graph, entra = FakeSmart(), FakeGraph(), FakeEntra()
    container.smart = smart  # type: ignore[assignment]
    container.graph = graph  # type: ignore[assignment]
    container.entra_signin = entra  # type: ignore[assignment]
    now = utcnow() - timedelta(minutes=1)
    config = TenantConfig(
        id=uuid.uuid4().hex,
        tenant_id=TENANT,
        region=container.settings.region,
        fhir_base_url=FHIR,
        approver_upn="approver@example.org",
        environment=Environment.TEST,
        provider_landing=landing,
        status=status,
        created_at=now,
        created_by="test",
        updated_at=now,
    )
    container.configs.add(config)
    return World(container, smart, graph, entra, config)
