"""Wire models of the configuration portal API (docs/design.md section 5, "Portal API").

Request bodies are validated with these models (unknown fields refused, each error names its
field) and responses are serialized through them; the OpenAPI document
(:mod:`connector_core.service.portal_openapi`) is generated from the very same classes.
JSON members are camelCase.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from connector_core.domain.models import (
    ConfigStatus,
    EhrVendor,
    Environment,
    ProviderLanding,
    Region,
)
from connector_core.errors import InvalidInputError

__all__ = [
    "ADMIN_ROLE",
    "AUDITOR_ROLE",
    "BackendServices",
    "Caller",
    "ConfigChangeOut",
    "ConfigInput",
    "ConfigOut",
    "EhrSigninOut",
    "FieldError",
    "IntegrationRecord",
    "Problem",
    "parse_body",
]

ADMIN_ROLE = "Connector.Admin"
# Read-only access to configs and their audit trail (compliance staff); optional app role.
AUDITOR_ROLE = "Connector.Auditor"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
UPN_PATTERN = rf"^[^@\s]{{1,128}}@{_LABEL}(?:\.{_LABEL})+$"
CLIENT_ID_PATTERN = r"^[\x21-\x7e]{1,256}$"


@dataclass(frozen=True)
class Caller:
    """The verified portal user (from the Entra access token)."""

    tenant_id: str
    object_id: str | None
    upn: str | None
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    @property
    def is_auditor(self) -> bool:
        return AUDITOR_ROLE in self.roles

    @property
    def actor(self) -> str:
        """Who to name in the audit trail: the UPN, else the object id."""
        return self.upn or self.object_id or "unknown"


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )


# --- requests ---------------------------------------------------------------------------------


class ConfigInput(_Wire):
    """Body of ``POST /configs`` and ``PUT /configs/{id}`` (PUT replaces every editable field:
    omitted optional fields take their defaults)."""

    fhir_base_url: str = Field(
        min_length=1,
        max_length=2048,
        description="The EHR's FHIR R4 base URL (https; http and internal addresses only in dev "
        "mode). It must publish .well-known/smart-configuration with PKCE S256.",
        examples=["https://fhir.example-health.org/api/FHIR/R4"],
    )
    approver_upn: str = Field(
        max_length=256,
        pattern=UPN_PATTERN,
        description="UPN of the EHR analyst who signs in to the EHR and approves the config.",
        examples=["ehr.analyst@contoso.onmicrosoft.com"],
    )
    environment: Environment = Field(description="test or production")
    ehr_vendor: EhrVendor = Field(
        default=EhrVendor.SMART, description="epic adds Epic's connection-status calls"
    )
    smart_client_id: str | None = Field(
        default=None,
        pattern=CLIENT_ID_PATTERN,
        description="The connector's client id at this EHR, when it differs from SMART_CLIENT_ID",
    )
    provider_landing: ProviderLanding = Field(
        default=ProviderLanding.VISIT_PAGE,
        description="Where the provider launch lands: visit-page (opens the meeting and shows "
        "who is connected and waiting) or meeting (straight into the Teams meeting)",
    )


def parse_body(model: type[ConfigInput], body: Any) -> ConfigInput:
    """Validate a JSON body; ``InvalidInputError`` listing every wrong field and why."""
    if not isinstance(body, dict):
        raise InvalidInputError(
            "The request body must be a JSON object.",
            errors=[{"field": "", "code": "type", "message": "expected a JSON object"}],
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [_field_error(e) for e in exc.errors(include_url=False, include_input=False)]
        first = errors[0]
        where = f"{first['field']}: " if first["field"] else ""
        raise InvalidInputError(
            f"{where}{first['message']}"
            + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""),
            field=first["field"] or None,
            errors=errors,
        ) from None


_FRIENDLY = {
    "missing": "is required",
    "extra_forbidden": "is not a field of this request (read-only or unknown)",
    "string_type": "must be a string",
    "enum": "must be one of the allowed values",
    "string_too_short": "must not be empty",
}


def _field_error(error: Any) -> dict[str, str]:
    loc = error.get("loc", ())
    name = ".".join(str(part) for part in loc)
    kind = str(error.get("type", "invalid"))
    message = _FRIENDLY.get(kind) or str(error.get("msg", "is invalid"))
    if kind == "enum":
        expected = (error.get("ctx") or {}).get("expected")
        if expected:
            message = f"must be one of {expected}"
    if kind == "string_pattern_mismatch":
        message = {
            "approverUpn": "must be a user principal name such as analyst@contoso.com",
            "smartClientId": "must be 1-256 visible ASCII characters",
        }.get(name, "has an invalid format")
    return {"field": name, "code": kind, "message": message}


# --- responses --------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, defer_build=True
    )


class ConfigChangeOut(_Out):
    """One entry of the audit trail: who changed what, when (no clinical data)."""

    at: datetime
    by: str = Field(description="UPN (or object id) of the staff member")
    action: str = Field(description="created, updated, ehr_signin or approved")
    fields: list[str] = Field(description="names of the fields that changed (for updated)")


class IntegrationRecord(_Out):
    """What the EHR analyst enters in the EHR for one launch type."""

    type: Literal["provider", "patient", "device-test"]
    launch_url: str
    redirect_uri: str
    client_id: str
    scopes: list[str]
    jwks_url: str = Field(
        description="The connector's public keys (private_key_jwt client authentication)"
    )


class BackendServices(_Out):
    """SMART Backend Services registration the EHR needs for presence write-back."""

    client_id: str
    jwks_url: str
    scopes: list[str]
    token_endpoint_auth_method: Literal["private_key_jwt"] = "private_key_jwt"  # noqa: S105
    token_endpoint_auth_signing_alg: Literal["RS384"] = "RS384"  # noqa: S105


class ConfigOut(_Out):
    """A configuration as the portal shows it. ``integrationRecords`` and ``backendServices``
    are present only once the config is approved."""

    id: str
    tenant_id: str
    region: Region
    fhir_base_url: str
    approver_upn: str
    environment: Environment
    ehr_vendor: EhrVendor
    smart_client_id: str | None
    provider_landing: ProviderLanding = ProviderLanding.VISIT_PAGE
    status: ConfigStatus
    created_at: datetime
    created_by: str
    updated_at: datetime
    ehr_validated_at: datetime | None
    ehr_validated_by: str | None
    approved_at: datetime | None
    approved_by: str | None
    history: list[ConfigChangeOut]
    integration_records: list[IntegrationRecord] | None = None
    backend_services: BackendServices | None = None

    def to_json(self) -> dict[str, Any]:
        body = self.model_dump(mode="json", by_alias=True)
        for optional in ("integrationRecords", "backendServices"):
            if body.get(optional) is None:
                body.pop(optional, None)
        return body


class EhrSigninOut(_Out):
    authorize_url: str = Field(description="Open this URL in the browser to sign in to the EHR")
    expires_in: int = Field(description="seconds until the sign-in request expires")


class FieldError(_Out):
    field: str
    code: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details, as every portal error is answered."""

    model_config = ConfigDict(title="Problem", extra="allow")

    type: str
    title: str
    status: int
    detail: str
    correlationId: str
    field: str | None = Field(default=None, description="the request field that is wrong")
    code: str | None = Field(default=None, description="a stable code for the failed check")
    errors: list[FieldError] | None = None
    existingId: str | None = Field(
        default=None, description="409: the id of the config already registered"
    )
