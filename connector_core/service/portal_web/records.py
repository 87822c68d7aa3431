"""Integration records as each EHR's analyst enters them (docs/ehr-setup.md).

The JSON API's ``integrationRecords`` are EHR-neutral (launch URL, redirect URI, client id,
scopes). An Epic analyst builds FDI records whose launch URLs carry Epic's context tokens
(``%PERFDEPID%``, ``%CSN%``; ``%CONFERENCEID%`` on the group-visit record); an Oracle Health
analyst registers Code Console applications with a SMART launch URI; any other SMART EHR takes
the launch URLs as they are. Pure: the values come from the approved config's view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from connector_core.service.portal_models import ConfigOut, IntegrationRecord
from connector_core.service.portal_web.i18n import N_

__all__ = [
    "EPIC_GROUP_VISIT_QUERY",
    "EPIC_VISIT_QUERY",
    "RecordField",
    "RecordGroup",
    "records_for",
]

# Epic fills these from the visit: the department (for reports) and the encounter (CSN), or
# the conference id on the group-visit record, so all its participants reach one meeting.
EPIC_VISIT_QUERY = "departmentId=%PERFDEPID%&sessionId=%CSN%"
EPIC_GROUP_VISIT_QUERY = "departmentId=%PERFDEPID%&sessionId=%CONFERENCEID%"


@dataclass(frozen=True)
class RecordField:
    label: str  # msgid
    value: str
    key: str  # stable id for the page (copy buttons, tests)


@dataclass(frozen=True)
class RecordGroup:
    title: str  # msgid
    where: str  # msgid: where in the EHR the analyst enters it
    key: str
    fields: tuple[RecordField, ...]


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _client_fields(config: ConfigOut, signin_callback: str) -> tuple[RecordField, ...]:
    records = {r.type: r for r in config.integration_records or ()}
    provider, patient = records["provider"], records["patient"]
    fields = [
        RecordField(N_("Client ID"), provider.client_id, "client-id"),
        RecordField(N_("Redirect URI (launches)"), provider.redirect_uri, "redirect-uri"),
        RecordField(N_("Redirect URI (approver's EHR sign-in)"), signin_callback, "signin-uri"),
        RecordField(N_("Public keys (JWKS URL)"), provider.jwks_url, "jwks-url"),
        RecordField(N_("Scopes, provider launch"), " ".join(provider.scopes), "provider-scopes"),
        RecordField(N_("Scopes, patient launch"), " ".join(patient.scopes), "patient-scopes"),
    ]
    if config.backend_services is not None:
        fields.append(
            RecordField(
                N_("Scopes, write-back (backend services)"),
                " ".join(config.backend_services.scopes),
                "backend-scopes",
            )
        )
        fields.append(
            RecordField(
                N_("Client authentication"),
                f"{config.backend_services.token_endpoint_auth_method} "
                f"({config.backend_services.token_endpoint_auth_signing_alg})",
                "client-auth",
            )
        )
    return tuple(fields)


def records_for(config: ConfigOut, *, api_base_url: str) -> tuple[RecordGroup, ...]:
    """The records to show for an approved config (empty before approval)."""
    if not config.integration_records:
        return ()
    records: dict[str, IntegrationRecord] = {r.type: r for r in config.integration_records}
    provider, patient = records["provider"].launch_url, records["patient"].launch_url
    client = _client_fields(config, f"{api_base_url}/ehr-signin/callback")
    vendor = config.ehr_vendor.value
    return _by_vendor(config, vendor, provider, patient, client) + _device_test(records)


def _device_test(records: Mapping[str, IntegrationRecord]) -> tuple[RecordGroup, ...]:
    record = records.get("device-test")
    if record is None:
        return ()
    return (
        RecordGroup(
            N_("Device check for patients (a link in the patient portal)"),
            N_(
                "A plain web link, no SMART launch: patients check camera, microphone and "
                "speaker before the visit. Nothing leaves their device."
            ),
            "device-test",
            (RecordField(N_("Device check URL"), record.launch_url, "device-test-url"),),
        ),
    )


def _by_vendor(
    config: ConfigOut,
    vendor: str,
    provider: str,
    patient: str,
    client: tuple[RecordField, ...],
) -> tuple[RecordGroup, ...]:
    if vendor == "epic":
        return (
            RecordGroup(
                N_("Provider launch (FDI record for Hyperspace, Hyperdrive, Haiku and Canto)"),
                N_("Epic adds iss and launch itself; keep the context tokens as they are."),
                "epic-provider",
                (
                    RecordField(
                        N_("Launch URL"), _with_query(provider, EPIC_VISIT_QUERY), "launch-url"
                    ),
                ),
            ),
            RecordGroup(
                N_("Patient launch (FDI record for MyChart)"),
                N_("Epic adds iss and launch itself; keep the context tokens as they are."),
                "epic-patient",
                (
                    RecordField(
                        N_("Launch URL"), _with_query(patient, EPIC_VISIT_QUERY), "launch-url"
                    ),
                ),
            ),
            RecordGroup(
                N_("Group visits (FDI records keyed by the conference id)"),
                N_(
                    "Every clinician, interpreter and patient of a group visit reaches the same "
                    "meeting through %%CONFERENCEID%%."
                ),
                "epic-group",
                (
                    RecordField(
                        N_("Provider launch URL"),
                        _with_query(provider, EPIC_GROUP_VISIT_QUERY),
                        "provider-launch-url",
                    ),
                    RecordField(
                        N_("Patient launch URL"),
                        _with_query(patient, EPIC_GROUP_VISIT_QUERY),
                        "patient-launch-url",
                    ),
                ),
            ),
            RecordGroup(
                N_("Client registration (Epic on FHIR)"),
                N_(
                    "Audiences: clinicians or administrative users, patients, and backend "
                    "systems. Enter the JWKS URL as the non-production and production public "
                    "key set."
                ),
                "epic-client",
                client,
            ),
        )
    if vendor == "oracle":
        return (
            RecordGroup(
                N_("Provider application (Code Console): SMART launch URI"),
                N_("For PowerChart and MPages. Oracle Health adds iss and launch itself."),
                "oracle-provider",
                (RecordField(N_("SMART launch URI"), provider, "launch-url"),),
            ),
            RecordGroup(
                N_("Patient application (Code Console): SMART launch URI"),
                N_("For the patient portal. Oracle Health adds iss and launch itself."),
                "oracle-patient",
                (RecordField(N_("SMART launch URI"), patient, "launch-url"),),
            ),
            RecordGroup(
                N_("Both applications and the system account"),
                N_(
                    "Application type: confidential, with the JWKS URL. The system account "
                    "(write-back) uses the backend-services scopes."
                ),
                "oracle-client",
                client,
            ),
        )
    return (
        RecordGroup(
            N_("Provider launch"),
            N_("The EHR adds iss and launch to the launch URL."),
            "smart-provider",
            (RecordField(N_("Launch URL"), provider, "launch-url"),),
        ),
        RecordGroup(
            N_("Patient launch"),
            N_("The EHR adds iss and launch to the launch URL."),
            "smart-patient",
            (RecordField(N_("Launch URL"), patient, "launch-url"),),
        ),
        RecordGroup(
            N_("Client registration"),
            N_("Register the connector as a confidential client with these values."),
            "smart-client",
            client,
        ),
    )
