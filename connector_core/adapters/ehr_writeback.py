"""EHR write-back of presence: FHIR R4 ``AuditEvent`` (any EHR) and Epic's connection status.

* ``build_audit_event`` builds the resource with ``fhir.resources.R4B`` (validated there, so a
  bad resource fails here, not at the EHR): ``recorded`` = the event time, ``agent`` = the
  Practitioner or Patient from the visit's launch context (other staff by an opaque participant
  identifier), ``entity`` = the Appointment / Encounter / Patient, ``source.observer`` = the
  connector. The write-back key is carried as an entity identifier, so a record can be traced
  and a duplicate recognised.
* ``EhrWriter.post_audit_event`` POSTs it to ``{fhirBaseUrl}/AuditEvent`` with a SMART Backend
  Services token; ``EhrWriter.set_epic_connection_status`` calls
  ``{epicBase}/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus``.

Failures raise ``EhrError`` with the HTTP status (no response bodies: they may echo clinical
data); the caller retries through the queue. A token the EHR refuses (401, or 403 with
``invalid_token``) is marked ``reason="token_rejected"``: the caller fetches a fresh one
(``backend_token(..., fresh=True)``) and tries once more at once. Every call goes through the
guarded EHR client (``ehr_http``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from connector_core.domain.models import ParticipantRole
from connector_core.domain.presence import TransitionKind
from connector_core.errors import EhrError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CONNECTOR_OBSERVER",
    "EPIC_STATUS_PATH",
    "BackendTokens",
    "EhrWriter",
    "WritebackContext",
    "build_audit_event",
    "epic_base_url",
]

EPIC_STATUS_PATH = "/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus"
CONNECTOR_OBSERVER = "EHR virtual-visit connector"
PARTICIPANT_SYSTEM = "urn:ehr-virtual-visit:participant"
WRITEBACK_SYSTEM = "urn:ehr-virtual-visit:writeback"
PRESENCE_SYSTEM = "urn:ehr-virtual-visit:presence"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
FHIR_JSON = "application/fhir+json"


class BackendTokens(Protocol):
    """What the writer needs of ``SmartClient`` (connector_core.adapters.smart)."""

    def get_configuration(
        self, fhir_base_url: str, *, allowed_hosts: Iterable[str] = ()
    ) -> Any: ...

    def backend_token(self, smart: Any, *, client_id: str, scope: str) -> str: ...

    def forget_backend_token(self, smart: Any, *, client_id: str, scope: str) -> None: ...


@dataclass(frozen=True)
class WritebackContext:
    """The EHR references of a visit (from its sealed launch context). Plain FHIR ids."""

    patient_id: str | None = None
    practitioner_id: str | None = None
    appointment_id: str | None = None
    encounter_id: str | None = None
    conference_id: str | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> WritebackContext:
        """Read the unsealed ``visit-context`` payload: plain ids (``patient``/``patient_id``/
        ``patientId``) or references (``Patient/123``), keys compared ignoring case."""
        lowered = {str(k).lower().replace("_", ""): v for k, v in payload.items()}

        def pick(rtype: str, *names: str) -> str | None:
            for name in names:
                value = lowered.get(name.lower().replace("_", ""))
                if isinstance(value, str) and value:
                    prefix = f"{rtype}/"
                    if value.startswith(prefix):
                        return value[len(prefix) :]
                    if "/" in value:  # an absolute reference: keep its id
                        return value.rstrip("/").rsplit("/", 1)[-1]
                    return value
            return None

        return cls(
            patient_id=pick("Patient", "patient_id", "patient", "patient_ref"),
            practitioner_id=pick(
                "Practitioner", "practitioner_id", "practitioner", "practitioner_ref", "fhir_user"
            ),
            appointment_id=pick("Appointment", "appointment_id", "appointment", "appointment_ref"),
            encounter_id=pick("Encounter", "encounter_id", "encounter", "encounter_ref"),
            conference_id=pick("Conference", "conference_id", "conference"),
        )


def _time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def build_audit_event(
    *,
    transition: TransitionKind,
    role: ParticipantRole,
    participant_key: str,
    at: datetime,
    context: WritebackContext,
    writeback_key: str,
    site: str,
) -> dict[str, Any]:
    """The AuditEvent for one connect/disconnect, validated with fhir.resources.R4B."""
    from fhir.resources.R4B.auditevent import AuditEvent  # heavy: only the write-back needs it

    connect = transition is TransitionKind.CONNECT
    who: dict[str, Any]
    if role is ParticipantRole.CLINICIAN and context.practitioner_id:
        who = {"reference": f"Practitioner/{context.practitioner_id}"}
    elif role is ParticipantRole.PATIENT and context.patient_id:
        who = {"reference": f"Patient/{context.patient_id}"}
    else:
        who = {"identifier": {"system": PARTICIPANT_SYSTEM, "value": participant_key}}
    agent_type = "PPRF" if role is ParticipantRole.CLINICIAN else "PART"
    agent_display = "primary performer" if role is ParticipantRole.CLINICIAN else "participation"
    entities: list[dict[str, Any]] = []
    if context.appointment_id:
        entities.append(
            {
                "what": {"reference": f"Appointment/{context.appointment_id}"},
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            }
        )
    if context.encounter_id:
        entities.append(
            {
                "what": {"reference": f"Encounter/{context.encounter_id}"},
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            }
        )
    if context.patient_id:
        entities.append(
            {
                "what": {"reference": f"Patient/{context.patient_id}"},
                "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    entities.append(
        {
            "what": {"identifier": {"system": WRITEBACK_SYSTEM, "value": writeback_key}},
            "description": "Virtual visit presence record",
        }
    )
    body: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": _DCM, "code": "110114", "display": "User Authentication"},
        "subtype": [
            {
                "system": _DCM,
                "code": "110122" if connect else "110123",
                "display": "Login" if connect else "Logout",
            },
            {
                "system": PRESENCE_SYSTEM,
                "code": transition.value,
                "display": (
                    "Connected to the virtual visit"
                    if connect
                    else "Disconnected from the virtual visit"
                ),
            },
        ],
        "action": "E",
        "recorded": _time(at),
        "outcome": "0",
        "outcomeDesc": f"{role.value} {'connected' if connect else 'disconnected'}",
        "agent": [
            {
                "type": {
                    "coding": [
                        {"system": _PARTICIPATION, "code": agent_type, "display": agent_display}
                    ]
                },
                "who": who,
                "altId": participant_key,
                "requestor": True,
            }
        ],
        "source": {
            "site": site,
            "observer": {"display": CONNECTOR_OBSERVER},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }
    resource = AuditEvent.model_validate(body)
    result: dict[str, Any] = resource.model_dump(mode="json", exclude_none=True, by_alias=True)
    return result


def epic_base_url(fhir_base_url: str) -> str:
    """Epic's web-services base for a FHIR base: ``https://h/interconnect/api/FHIR/R4`` ->
    ``https://h/interconnect``; any other ``.../fhir/...`` base is cut before ``/fhir``."""
    parts = urlsplit(fhir_base_url)
    path = parts.path
    lower = path.lower()
    for marker in ("/api/fhir/", "/fhir/"):
        index = (lower + "/").find(marker)
        if index >= 0:
            path = path[:index]
            break
    return urlunsplit((parts.scheme, parts.netloc, path.rstrip("/"), "", ""))


class EhrWriter:
    """Writes presence to an EHR over the shared httpx client."""

    def __init__(self, *, http: httpx.Client, tokens: BackendTokens) -> None:
        self._http = http
        self._tokens = tokens

    def backend_token(
        self,
        fhir_base_url: str,
        *,
        client_id: str,
        scope: str,
        allowed_hosts: Iterable[str] = (),
        fresh: bool = False,
    ) -> str:
        """A backend-services token; ``fresh`` drops the cached one first (the EHR rejected
        it: revoked before its expiry)."""
        smart = self._tokens.get_configuration(fhir_base_url, allowed_hosts=allowed_hosts)
        if fresh:
            self._tokens.forget_backend_token(smart, client_id=client_id, scope=scope)
        return self._tokens.backend_token(smart, client_id=client_id, scope=scope)

    def _post(self, url: str, *, token: str, json_body: Any, content_type: str, what: str) -> None:
        import httpx

        try:
            response = self._http.post(
                url,
                json=json_body,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": content_type,
                    "Accept": f"{FHIR_JSON}, application/json",
                },
            )
        except httpx.HTTPError as exc:
            raise EhrError(
                f"The EHR could not be reached for {what} ({type(exc).__name__}).",
                ehrStatus=None,
            ) from None
        if response.status_code >= 300:
            challenge = response.headers.get("www-authenticate", "").lower()
            rejected = response.status_code == 401 or (
                response.status_code == 403 and "invalid_token" in challenge
            )
            raise EhrError(
                f"The EHR answered {response.status_code} to {what}.",
                ehrStatus=response.status_code,
                # The token itself was refused: the caller retries once with a fresh one.
                reason="token_rejected" if rejected else None,
            )

    def post_audit_event(
        self, fhir_base_url: str, resource: Mapping[str, Any], *, token: str
    ) -> None:
        self._post(
            f"{fhir_base_url.rstrip('/')}/AuditEvent",
            token=token,
            json_body=dict(resource),
            content_type=FHIR_JSON,
            what="the AuditEvent",
        )

    def set_epic_connection_status(
        self,
        fhir_base_url: str,
        *,
        token: str,
        conference_id: str,
        external_id: str,
        external_id_type: str,
        connected: bool,
    ) -> None:
        self._post(
            epic_base_url(fhir_base_url) + EPIC_STATUS_PATH,
            token=token,
            json_body={
                "ConferenceID": conference_id,
                "ExternalID": external_id,
                "ExternalIDType": external_id_type,
                "ConnectionStatus": "Connected" if connected else "Disconnected",
                "VendorName": CONNECTOR_OBSERVER,
            },
            content_type="application/json",
            what="the Epic connection status",
        )
