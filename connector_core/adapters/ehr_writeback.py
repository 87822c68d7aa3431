"""EHR write-back of presence: FHIR R4 ``AuditEvent`` (any EHR) and Epic's connection status.

* ``build_audit_event`` builds the resource with ``fhir.resources.R4B`` (validated there, so a
  bad resource fails here, not at the EHR): ``recorded`` = the event time, ``agent`` = the
  Practitioner or Patient from the visit's launch context (other staff by an opaque participant
  identifier), ``entity`` = the Appointment / Encounter / Patient, ``source.observer`` = the
  connector. The write-back key is carried as an entity identifier
  (``urn:ehr-virtual-visit:writeback``). The parts that depend on the visit and the kind of
  write-back are validated once and kept (``_template``); per event only the time and keys are
  filled in.
* ``EhrWriter.post_audit_event`` POSTs it to ``{fhirBaseUrl}/AuditEvent`` with a SMART Backend
  Services token, **created conditionally**: ``If-None-Exist:
  entity:identifier=urn:ehr-virtual-visit:writeback|{key}`` (FHIR R4 conditional create; the
  ``:identifier`` modifier of the ``entity`` reference parameter), so a retry after a timeout
  finds the resource stored by the first attempt instead of making a second one (200, or 412
  when several match). ``find_audit_event`` searches by the same identifier: for EHRs that
  ignore ``If-None-Exist``, the caller reconciles before retrying an attempt whose outcome it
  does not know (with a ``system/AuditEvent.read`` token; see ``RECONCILE_SCOPES``).
  ``EhrWriter.set_epic_connection_status`` calls
  ``{epicBase}/api/epic/2018/Telehealth/ContextLinking/SetExternalConnectionStatus`` (a status:
  repeating it is harmless).

Failures raise ``EhrError`` with the HTTP status (no response bodies: they may echo clinical
data) and two facts the caller's retry needs: ``sent`` (the request may have reached the EHR: a
timeout after sending, a 5xx; not for a refused connection or a 4xx) and ``permanent`` (a 4xx
that the same request can never pass: 400, 405, 406, 410, 413, 415, 422). A token the EHR
refuses (401, or 403 with ``invalid_token``) is marked ``reason="token_rejected"``: the caller
fetches a fresh one (``backend_token(..., fresh=True)``) and tries once more at once. Every call
goes through the guarded EHR client (``ehr_http``).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from connector_core.domain.models import ParticipantRole
from connector_core.domain.presence import TransitionKind, WritebackOutcome
from connector_core.errors import EhrError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CONNECTOR_OBSERVER",
    "EPIC_STATUS_PATH",
    "PERMANENT_STATUSES",
    "RECONCILE_SCOPES",
    "WRITEBACK_SYSTEM",
    "BackendTokens",
    "EhrWriter",
    "WritebackContext",
    "build_audit_event",
    "epic_base_url",
    "writeback_search",
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
# Statuses the same request can never pass: the write-back is poisoned at once, with the reason.
PERMANENT_STATUSES = frozenset({400, 405, 406, 410, 413, 415, 422})
# Searching for a write-back before retrying one whose first attempt's outcome is unknown (the
# EHR may ignore If-None-Exist). Asked for apart from the write scope, so an EHR that grants
# only the write keeps working (then the conditional create alone protects the retry).
RECONCILE_SCOPES: tuple[str, ...] = ("system/AuditEvent.read",)


def writeback_search(writeback_key: str) -> str:
    """The FHIR search that finds a write-back's AuditEvent (conditional create and reconcile)."""
    return f"entity:identifier={WRITEBACK_SYSTEM}|{writeback_key}"


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


def _resource(
    *,
    transition: TransitionKind,
    role: ParticipantRole,
    participant_key: str,
    at: datetime,
    context: WritebackContext,
    writeback_key: str,
    site: str,
) -> dict[str, Any]:
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
    return {
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


def validate_audit_event(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` through fhir.resources.R4B (a bad resource fails here, not at the EHR)."""
    from fhir.resources.R4B.auditevent import AuditEvent  # heavy: only the write-back needs it

    resource = AuditEvent.model_validate(dict(body))
    result: dict[str, Any] = resource.model_dump(mode="json", exclude_none=True, by_alias=True)
    return result


# Placeholders of the per-event values in a validated template (valid FHIR in their places).
_AT = datetime(2000, 1, 1, tzinfo=UTC)
_KEY = "0" * 32
_TEMPLATES: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
_TEMPLATES_LOCK = threading.Lock()
_MAX_TEMPLATES = 4096


def _template(
    transition: TransitionKind,
    role: ParticipantRole,
    context: WritebackContext,
    site: str,
    anonymous: bool,
) -> dict[str, Any]:
    """The validated AuditEvent of one kind of write-back for one visit (cached): everything
    but the event time and the keys, which ``build_audit_event`` fills in."""
    cache_key = (transition, role, context, site, anonymous)
    with _TEMPLATES_LOCK:
        found = _TEMPLATES.get(cache_key)
        if found is not None:
            _TEMPLATES.move_to_end(cache_key)
            return found
    template = validate_audit_event(
        _resource(
            transition=transition,
            role=role,
            participant_key=_KEY,
            at=_AT,
            context=context,
            writeback_key=_KEY,
            site=site,
        )
    )
    with _TEMPLATES_LOCK:
        _TEMPLATES[cache_key] = template
        while len(_TEMPLATES) > _MAX_TEMPLATES:
            _TEMPLATES.popitem(last=False)
    return template


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
    """The AuditEvent for one connect/disconnect, validated with fhir.resources.R4B (the same
    resource as validating it whole: tests/unit/test_ehr_writeback.py compares them)."""
    anonymous = not (
        (role is ParticipantRole.CLINICIAN and context.practitioner_id)
        or (role is ParticipantRole.PATIENT and context.patient_id)
    )
    resource = copy.deepcopy(_template(transition, role, context, site, anonymous))
    resource["recorded"] = _time(at)
    agent = resource["agent"][0]
    agent["altId"] = participant_key
    if anonymous:
        agent["who"]["identifier"]["value"] = participant_key
    resource["entity"][-1]["what"]["identifier"]["value"] = writeback_key
    return resource


def _conditional_create(document: Any) -> bool:
    """``conditionalCreate`` of AuditEvent in a CapabilityStatement."""
    if not isinstance(document, dict) or document.get("resourceType") != "CapabilityStatement":
        return False
    for rest in document.get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        for resource in rest.get("resource") or []:
            if isinstance(resource, dict) and resource.get("type") == "AuditEvent":
                return resource.get("conditionalCreate") is True
    return False


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

    # How long what a CapabilityStatement says is believed (and how long a failure to read it).
    CAPABILITY_TTL = 3600.0
    CAPABILITY_FAILURE_TTL = 300.0

    def __init__(
        self,
        *,
        http: httpx.Client,
        tokens: BackendTokens,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._tokens = tokens
        self._clock = clock
        self._capabilities: dict[str, tuple[float, bool]] = {}
        self._capabilities_lock = threading.Lock()

    def conditional_create_supported(self, fhir_base_url: str) -> bool:
        """Whether the EHR's CapabilityStatement says it honours ``If-None-Exist`` on
        AuditEvent (``rest.resource.conditionalCreate``); read once an hour per EHR. Not
        readable: False (for a few minutes), so the caller takes the way that does not rely on
        it."""
        base = fhir_base_url.rstrip("/")
        now = self._clock()
        with self._capabilities_lock:
            cached = self._capabilities.get(base)
        if cached is not None and cached[0] > now:
            return cached[1]
        import httpx

        supported, ttl = False, self.CAPABILITY_FAILURE_TTL
        try:
            response = self._http.get(
                f"{base}/metadata", headers={"Accept": f"{FHIR_JSON}, application/json"}
            )
            if response.status_code == 200:
                document = response.json()
                supported = _conditional_create(document)
                ttl = self.CAPABILITY_TTL
        except (httpx.HTTPError, ValueError):
            pass
        with self._capabilities_lock:
            self._capabilities[base] = (now + ttl, supported)
        return supported

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

    def _send(
        self,
        method: str,
        url: str,
        *,
        token: str,
        what: str,
        json_body: Any = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        also_ok: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        import httpx

        sent_headers = {
            "Authorization": f"Bearer {token}",
            "Accept": f"{FHIR_JSON}, application/json",
            **(headers or {}),
        }
        if content_type:
            sent_headers["Content-Type"] = content_type
        try:
            response = self._http.request(
                method, url, json=json_body, headers=sent_headers, params=params
            )
        except httpx.HTTPError as exc:
            # A refused or failed connection never reached the EHR; a timeout or a broken
            # answer may have (the EHR may have stored the resource).
            unsent = isinstance(
                exc,
                httpx.ConnectError
                | httpx.ConnectTimeout
                | httpx.PoolTimeout
                | httpx.UnsupportedProtocol,
            )
            raise EhrError(
                f"The EHR could not be reached for {what} ({type(exc).__name__}).",
                ehrStatus=None,
                sent=not unsent,
                permanent=False,
            ) from None
        status = response.status_code
        if status >= 300 and status not in also_ok:
            challenge = response.headers.get("www-authenticate", "").lower()
            rejected = status == 401 or (status == 403 and "invalid_token" in challenge)
            raise EhrError(
                f"The EHR answered {status} to {what}.",
                ehrStatus=status,
                # The token itself was refused: the caller retries once with a fresh one.
                reason="token_rejected" if rejected else None,
                sent=status >= 500 or status == 408,
                permanent=status in PERMANENT_STATUSES,
            )
        return response

    def post_audit_event(
        self,
        fhir_base_url: str,
        resource: Mapping[str, Any],
        *,
        token: str,
        writeback_key: str | None = None,
    ) -> WritebackOutcome:
        """POST the AuditEvent; with ``writeback_key``, conditionally (``If-None-Exist``).
        ``CREATED`` (201) or ``EXISTED`` (200: an earlier attempt stored it; 412: several
        did)."""
        headers = {"If-None-Exist": writeback_search(writeback_key)} if writeback_key else None
        response = self._send(
            "POST",
            f"{fhir_base_url.rstrip('/')}/AuditEvent",
            token=token,
            json_body=dict(resource),
            content_type=FHIR_JSON,
            headers=headers,
            what="the AuditEvent",
            # A conditional create matching several resources: it is there (more than once).
            also_ok=frozenset({412}) if writeback_key else frozenset(),
        )
        if response.status_code == 201:
            return WritebackOutcome.CREATED
        return WritebackOutcome.EXISTED

    def find_audit_event(self, fhir_base_url: str, *, token: str, writeback_key: str) -> bool:
        """Whether the EHR holds the write-back's AuditEvent (a search by its identifier)."""
        response = self._send(
            "GET",
            f"{fhir_base_url.rstrip('/')}/AuditEvent",
            token=token,
            params={"entity:identifier": f"{WRITEBACK_SYSTEM}|{writeback_key}", "_count": "1"},
            what="the AuditEvent search",
        )
        try:
            bundle = response.json()
        except ValueError:
            raise EhrError(
                "The EHR answered the AuditEvent search with something else than JSON.",
                ehrStatus=response.status_code,
                sent=False,
                permanent=False,
            ) from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise EhrError(
                "The EHR answered the AuditEvent search without a Bundle.",
                ehrStatus=response.status_code,
                sent=False,
                permanent=False,
            )
        total = bundle.get("total")
        entries = bundle.get("entry") or []
        return bool(entries) or (isinstance(total, int) and total > 0)

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
        self._send(
            "POST",
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
