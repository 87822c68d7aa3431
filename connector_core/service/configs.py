"""Configuration portal use cases (docs/design.md section 5, "Portal API").

A Microsoft 365 admin (app role ``Connector.Admin``) registers a FHIR base URL for the test or
production environment and names an approver; the approver (an EHR analyst, identified by the
UPN in the portal token, same tenant) proves EHR access with a SMART standalone launch and then
approves; both then see the integration records to enter in the EHR.

Rules enforced here:

- every record is read in the caller's tenant partition (``tid``): another tenant's id is 404;
- admin-only: create, update, delete; approver-only: EHR sign-in and approval; read: admin,
  auditor (``Connector.Auditor``, read-only) or the approver of that config;
- writes are optimistic: PUT needs ``If-Match`` (428 without, 412 when stale), DELETE and approve
  honour it when sent; concurrent writes between read and write are 412 as well;
- one config per tenant, environment and FHIR base URL (409 with ``existingId``);
- the FHIR base URL passes :class:`~connector_core.adapters.fhir_probe.FhirProbe` before it is
  stored (create, and update when the URL changes);
- approval needs an EHR sign-in by the approver within 30 minutes; any real change (PUT) sends
  the config back to ``pending_approval`` (see :class:`TenantConfig`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from connector_core.bootstrap import Container
from connector_core.crypto import new_pkce_pair, random_token
from connector_core.domain.models import ConfigChange, TenantConfig, Versioned
from connector_core.domain.scopes import (
    BACKEND_SERVICES_SCOPES,
    EHR_SIGNIN_SCOPES,
    PATIENT_LAUNCH_SCOPES,
    PROVIDER_LAUNCH_SCOPES,
    scope_string,
)
from connector_core.domain.visit_keys import parse_reference
from connector_core.errors import (
    AuthenticationError,
    ConcurrencyConflictError,
    ConflictError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionRequiredError,
)
from connector_core.logs import get_logger, log_event
from connector_core.repositories import trim_history

if TYPE_CHECKING:
    from connector_core.adapters.fhir_probe import ProbeReport
from connector_core.service.portal_models import (
    BackendServices,
    Caller,
    ConfigChangeOut,
    ConfigInput,
    ConfigOut,
    EhrSigninOut,
    IntegrationRecord,
)

__all__ = [
    "EHR_SIGNIN_STATE_TTL",
    "SigninCompleted",
    "approve_config",
    "authenticate",
    "complete_ehr_signin",
    "config_history",
    "config_view",
    "create_config",
    "delete_config",
    "endpoint_allowance",
    "get_config",
    "http_etag",
    "list_configs",
    "start_ehr_signin",
    "update_config",
]

EHR_SIGNIN_STATE_TTL = 600  # seconds: the sealed state of an EHR sign-in
_STATE_PURPOSE = "ehr-signin-state"
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_OAUTH_ERROR_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PRACTITIONER_TYPES = ("Practitioner", "PractitionerRole")
_log = get_logger("portal")


# --- who is calling ---------------------------------------------------------------------------


def authenticate(container: Container, authorization: str | None) -> Caller:
    """The caller of a portal request, from its ``Authorization: Bearer`` Entra token."""
    if not authorization:
        raise AuthenticationError(
            "Sign in first: send 'Authorization: Bearer <Entra ID access token for the "
            "connector's API>'."
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("The Authorization header must be 'Bearer <access token>'.")
    claims = container.portal_tokens.validate(token.strip())
    if not container.settings.tenant_may_onboard(str(claims["tid"])):
        log_event(_log, "portal.tenant_not_allowed", level=logging.WARNING, tenant_id=claims["tid"])
        raise PermissionDeniedError(
            "This connector deployment does not serve your organization (its Microsoft Entra "
            "tenant is not in CONNECTOR_ALLOWED_TENANTS).",
            action="Ask the operator of this deployment to add your tenant id to "
            "CONNECTOR_ALLOWED_TENANTS, or use your organization's own deployment.",
        )
    upn = claims.get("preferred_username") or claims.get("upn")
    roles = claims.get("roles")
    oid = claims.get("oid")
    return Caller(
        tenant_id=str(claims["tid"]).lower(),
        object_id=oid if isinstance(oid, str) else None,
        upn=upn if isinstance(upn, str) and upn else None,
        roles=frozenset(r for r in roles if isinstance(r, str))
        if isinstance(roles, list)
        else frozenset(),
    )


def _require_admin(caller: Caller, doing: str) -> None:
    if not caller.is_admin:
        raise PermissionDeniedError(
            f"{doing} needs the Connector.Admin app role. Ask a Microsoft 365 administrator of "
            "your organization to assign it to you for the connector's app."
        )


def _require_approver(caller: Caller, config: TenantConfig, doing: str) -> None:
    if not config.approver_matches(upn=caller.upn, oid=caller.object_id):
        raise PermissionDeniedError(
            f"Only the approver named in this configuration can {doing}. An admin can change "
            "the approver (PUT /api/configs/{id})."
        )


def _can_read(caller: Caller, config: TenantConfig) -> bool:
    return (
        caller.is_admin
        or caller.is_auditor
        or config.approver_matches(upn=caller.upn, oid=caller.object_id)
    )


# --- ETags ------------------------------------------------------------------------------------


def http_etag(versioned: Versioned[TenantConfig]) -> str:
    """A strong, opaque HTTP entity tag for the stored version (storage ETags stay internal)."""
    digest = hashlib.sha256(f"{versioned.record.id}\x00{versioned.etag}".encode()).hexdigest()
    return f'"{digest[:32]}"'


def _check_if_match(
    if_match: str | None, current: Versioned[TenantConfig], *, required: bool
) -> None:
    if if_match is None or not if_match.strip():
        if required:
            raise PreconditionRequiredError(
                "This change needs an If-Match header with the config's ETag: GET the config, "
                "then send its ETag header value as If-Match."
            )
        return
    tags = [t.strip() for t in if_match.split(",")]
    if "*" in tags:
        return
    expected = http_etag(current)
    if not any(t.removeprefix("W/") == expected for t in tags):
        raise ConcurrencyConflictError(
            "The configuration was changed since you read it (stale ETag). GET it again, "
            "review the changes and retry with the new ETag.",
            currentEtag=expected,
        )


# --- reads ------------------------------------------------------------------------------------


def _load(container: Container, caller: Caller, config_id: str) -> Versioned[TenantConfig]:
    if not _ID_RE.match(config_id):
        raise NotFoundError(f"No configuration {config_id[:64]!r}.")
    # The tenant partition comes from the verified token: other tenants' ids are simply not found.
    return container.configs.get(caller.tenant_id, config_id)


def get_config(container: Container, caller: Caller, config_id: str) -> Versioned[TenantConfig]:
    current = _load(container, caller, config_id)
    if not _can_read(caller, current.record):
        raise PermissionDeniedError(
            "Only admins (Connector.Admin), auditors (Connector.Auditor) and the config's "
            "approver can read it."
        )
    return current


def list_configs(container: Container, caller: Caller) -> list[Versioned[TenantConfig]]:
    """Admins and auditors see every config of their tenant; others the ones they approve."""
    items = container.configs.list(caller.tenant_id)
    if not (caller.is_admin or caller.is_auditor):
        items = [
            v for v in items if v.record.approver_matches(upn=caller.upn, oid=caller.object_id)
        ]
    return sorted(items, key=lambda v: (v.record.created_at, v.record.id))


def config_history(container: Container, caller: Caller, config_id: str) -> list[ConfigChangeOut]:
    """The whole audit trail, oldest first (the config record itself keeps only the latest
    changes: ``repositories.HISTORY_IN_RECORD``)."""
    current = get_config(container, caller, config_id)
    trail = container.configs.history(current.record.tenant_id, current.record.id)
    return [_change_out(c) for c in trail]


# --- writes -----------------------------------------------------------------------------------


def _client_id(container: Container, config: TenantConfig) -> str:
    return config.smart_client_id or container.settings.smart_client_id


def _forget_in_launch_cache(container: Container, config_id: str) -> None:
    """Launches and write-backs on this worker stop using a changed or deleted config at once
    (other workers within the launch cache's TTL)."""
    container.launch_cache.forget_config(config_id)


def _ensure_unique(
    container: Container, tenant_id: str, environment: str, url: str, *, own_id: str | None
) -> None:
    existing = container.configs.find_id_by_url(tenant_id, environment, url)
    if existing is not None and existing != own_id:
        raise ConflictError(
            f"This FHIR base URL is already registered for the {environment} environment "
            f"(config {existing}); edit that config instead.",
            existingId=existing,
        )


def endpoint_allowance(report: ProbeReport) -> tuple[str, ...]:
    """Hosts of the EHR's endpoints other than the FHIR base's own (its allowance)."""
    from connector_core.adapters.ehr_http import describe_hosts

    base = describe_hosts([report.fhir_base_url])
    found = describe_hosts([report.authorization_endpoint, report.token_endpoint, report.jwks_uri])
    return tuple(sorted(h for h in found if h not in base))


def create_config(
    container: Container, caller: Caller, body: ConfigInput
) -> Versioned[TenantConfig]:
    _require_admin(caller, "Registering a FHIR base URL")
    probe = container.fhir_probe
    url = probe.check_syntax(body.fhir_base_url)
    _ensure_unique(container, caller.tenant_id, body.environment.value, url, own_id=None)
    report = probe.probe(url)
    now = container.clock()
    config = TenantConfig(
        id=uuid.uuid4().hex,
        tenant_id=caller.tenant_id,
        region=container.settings.region,
        fhir_base_url=report.fhir_base_url,
        approver_upn=body.approver_upn,
        environment=body.environment,
        ehr_vendor=body.ehr_vendor,
        smart_client_id=body.smart_client_id,
        provider_landing=body.provider_landing,
        ehr_endpoint_hosts=endpoint_allowance(report),
        created_at=now,
        created_by=caller.actor,
        updated_at=now,
        history=(ConfigChange(at=now, by=caller.actor, action="created"),),
    )
    etag = container.configs.add(config)
    log_event(_log, "config.created", config_id=config.id, tenant_id=caller.tenant_id)
    return Versioned[TenantConfig](record=config, etag=etag)


def update_config(
    container: Container,
    caller: Caller,
    config_id: str,
    body: ConfigInput,
    *,
    if_match: str | None,
) -> Versioned[TenantConfig]:
    _require_admin(caller, "Changing a configuration")
    current = _load(container, caller, config_id)
    _check_if_match(if_match, current, required=True)
    record = current.record
    probe = container.fhir_probe
    url = probe.check_syntax(body.fhir_base_url)
    if url != record.fhir_base_url or body.environment != record.environment:
        _ensure_unique(container, caller.tenant_id, body.environment.value, url, own_id=record.id)
    # Probed on every save: the EHR's endpoints as they are now become the allowance that the
    # approver approves (a changed allowance is a change, back to pending approval).
    report = probe.probe(url)
    url = report.fhir_base_url
    approver = body.approver_upn
    if record.is_approver(approver):
        approver = record.approver_upn  # a change of letter case is no change
    updated = record.change(
        by=caller.actor,
        at=container.clock(),
        fhir_base_url=url,
        approver_upn=approver,
        environment=body.environment,
        ehr_vendor=body.ehr_vendor,
        smart_client_id=body.smart_client_id,
        provider_landing=body.provider_landing,
        ehr_endpoint_hosts=endpoint_allowance(report),
    )
    if updated is record:
        return current
    etag = container.configs.update(updated, expected=current)
    _forget_in_launch_cache(container, record.id)
    stored = trim_history(updated)
    log_event(
        _log,
        "config.updated",
        config_id=record.id,
        tenant_id=caller.tenant_id,
        fields=",".join(updated.history[-1].fields),
    )
    return Versioned[TenantConfig](record=stored, etag=etag)


def delete_config(
    container: Container, caller: Caller, config_id: str, *, if_match: str | None
) -> None:
    _require_admin(caller, "Deleting a configuration")
    current = _load(container, caller, config_id)
    _check_if_match(if_match, current, required=False)
    container.configs.delete(caller.tenant_id, config_id)
    _forget_in_launch_cache(container, config_id)
    log_event(_log, "config.deleted", config_id=config_id, tenant_id=caller.tenant_id)


def approve_config(
    container: Container, caller: Caller, config_id: str, *, if_match: str | None
) -> Versioned[TenantConfig]:
    current = _load(container, caller, config_id)
    _require_approver(caller, current.record, "approve it")
    _check_if_match(if_match, current, required=False)
    assert caller.upn is not None  # is_approver() needs a UPN
    approved = current.record.approve(by=caller.upn, at=container.clock())
    if approved is current.record:
        return current
    etag = container.configs.update(approved, expected=current)
    log_event(_log, "config.approved", config_id=config_id, tenant_id=caller.tenant_id)
    return Versioned[TenantConfig](record=trim_history(approved), etag=etag)


# --- EHR sign-in (SMART standalone launch) ------------------------------------------------------


def _signin_redirect_uri(container: Container) -> str:
    return f"{container.settings.api_base_url}/ehr-signin/callback"


def start_ehr_signin(container: Container, caller: Caller, config_id: str) -> EhrSigninOut:
    """The EHR's authorize URL for the approver; state sealed, single-use, 10 minutes."""
    current = _load(container, caller, config_id)
    config = current.record
    _require_approver(caller, config, "sign in to the EHR for it")
    if caller.object_id is None:
        raise PermissionDeniedError(
            "Your sign-in token has no object id (oid), which the approver is bound to.",
            action="Sign in to the portal again with your work account.",
        )
    if config.approver_oid is None:
        # The approver's first sign-in binds them (tid + oid): the UPN only named them.
        bound = config.bind_approver(caller.object_id)
        container.configs.update(bound, expected=current)
        _forget_in_launch_cache(container, config.id)
        log_event(_log, "config.approver_bound", config_id=config.id, tenant_id=caller.tenant_id)
        config = bound
    smart = container.smart.get_configuration(
        config.fhir_base_url, allowed_hosts=config.ehr_endpoint_hosts
    )
    verifier, challenge = new_pkce_pair()
    nonce = random_token(16)
    client_id = _client_id(container, config)
    state = container.keyring.seal(
        _STATE_PURPOSE,
        {
            "sid": random_token(16),  # 128 bits; consumed once in the callback
            "cid": config.id,
            "tid": config.tenant_id,
            "upn": caller.upn,
            "oid": caller.object_id,
            "v": verifier,
            "n": nonce,
            "iss": config.fhir_base_url,
            # The authorization server's issuer (RFC 9207), not the FHIR base URL.
            "as": smart.issuer,
            "asr": smart.authorization_response_iss_parameter_supported,
            "cl": client_id,
        },
        ttl_seconds=EHR_SIGNIN_STATE_TTL,
    )
    url = container.smart.build_authorize_url(
        smart,
        client_id=client_id,
        redirect_uri=_signin_redirect_uri(container),
        scope=scope_string(EHR_SIGNIN_SCOPES),
        state=state,
        code_challenge=challenge,
        aud=config.fhir_base_url,
        nonce=nonce,
    )
    log_event(_log, "config.ehr_signin_started", config_id=config.id, tenant_id=caller.tenant_id)
    return EhrSigninOut(authorize_url=url, expires_in=EHR_SIGNIN_STATE_TTL)


@dataclass(frozen=True)
class SigninCompleted:
    config_id: str
    redirect_url: str | None  # the portal, when CONNECTOR_PORTAL_URL is set


_RESTART = "Start the EHR sign-in again from the configuration portal."


def _check_same_url(config: TenantConfig, payload: dict[str, Any]) -> None:
    if config.fhir_base_url != payload["iss"]:
        raise InvalidStateError(
            "The configuration's FHIR base URL changed after this sign-in started.",
            action=_RESTART,
        )
    if config.approver_oid is not None and config.approver_oid != str(payload.get("oid")).lower():
        raise InvalidStateError(
            "The configuration's approver changed after this sign-in started.",
            action=_RESTART,
        )


def complete_ehr_signin(
    container: Container,
    *,
    state: str | None,
    code: str | None,
    error: str | None,
    iss: str | None = None,
) -> SigninCompleted:
    """Completes the approver's EHR sign-in and records it on the config."""
    if not state or len(state) > 4096:
        raise InvalidInputError("The EHR sign-in answer has no state.", action=_RESTART)
    from connector_core.service import launch_messages as refusals

    try:
        payload = container.keyring.unseal(_STATE_PURPOSE, state)
    except AuthenticationError:
        try:  # genuine but too old: say so (its own expiry, no table read)
            container.keyring.unseal(_STATE_PURPOSE, state, now=0.0)
        except AuthenticationError:
            raise refusals.ehr_signin_invalid() from None
        raise refusals.ehr_signin_expired() from None
    from connector_core.adapters.smart import verify_response_issuer

    issuer = payload.get("as")
    verify_response_issuer(
        iss,
        issuer=str(issuer) if isinstance(issuer, str) else None,
        required=payload.get("asr") is True,
    )
    now = container.clock()
    try:
        container.nonces.consume(
            str(payload["sid"]), expires_at=now + timedelta(seconds=EHR_SIGNIN_STATE_TTL)
        )
    except ConflictError:
        raise refusals.ehr_signin_used() from None
    config_id, tenant_id = str(payload["cid"]), str(payload["tid"])
    if error:
        shown = error if _OAUTH_ERROR_RE.match(error) else "error"
        log_event(_log, "config.ehr_signin_refused", config_id=config_id, error=shown)
        raise refusals.ehr_signin_refused(shown)
    if not code or len(code) > 4096:
        raise InvalidInputError(
            "The EHR sign-in answer has no authorization code.", action=_RESTART
        )
    try:
        current = container.configs.get(tenant_id, config_id)
    except NotFoundError:
        raise NotFoundError(
            "The configuration of this sign-in no longer exists.",
            action="Check the configuration in the portal.",
        ) from None
    _check_same_url(current.record, payload)
    smart = container.smart.get_configuration(
        str(payload["iss"]), allowed_hosts=current.record.ehr_endpoint_hosts
    )
    tokens = container.smart.exchange_code(
        smart,
        client_id=str(payload["cl"]),
        code=code,
        redirect_uri=_signin_redirect_uri(container),
        code_verifier=str(payload["v"]),
    )
    if not tokens.id_token:
        raise InvalidStateError(
            "The EHR did not confirm who signed in (no id_token for the openid scope).",
            action="Ask the EHR administrator to allow the openid and fhirUser scopes for the "
            "connector's client, then try again.",
        )
    claims: dict[str, Any] = container.smart.validate_id_token(
        smart, tokens.id_token, client_id=str(payload["cl"]), nonce=str(payload["n"])
    )
    if parse_reference(claims.get("fhirUser"), expected=_PRACTITIONER_TYPES) is None:
        log_event(_log, "config.ehr_signin_not_practitioner", config_id=config_id)
        raise PermissionDeniedError(
            "The EHR account you signed in with is not a practitioner's (its fhirUser is not "
            "a Practitioner or PractitionerRole), so it cannot prove access for the clinicians.",
            action="Sign in to the EHR with your own staff account (not a patient or test "
            "patient account), then try again from the configuration portal.",
        )
    upn = str(payload["upn"])
    for attempt in (1, 2):
        try:
            signed = current.record.record_ehr_signin(by=upn, at=container.clock())
            container.configs.update(signed, expected=current)
            break
        except ConcurrencyConflictError:
            if attempt == 2:
                raise
            current = container.configs.get(tenant_id, config_id)
            _check_same_url(current.record, payload)
    log_event(_log, "config.ehr_signin_completed", config_id=config_id, tenant_id=tenant_id)
    portal = container.settings.portal_url
    redirect = None
    if portal:
        redirect = f"{portal}?{urlencode({'configId': config_id, 'ehrSignin': 'ok'})}"
    return SigninCompleted(config_id=config_id, redirect_url=redirect)


# --- views ------------------------------------------------------------------------------------


def _change_out(change: ConfigChange) -> ConfigChangeOut:
    return ConfigChangeOut(
        at=change.at, by=change.by, action=change.action, fields=list(change.fields)
    )


def integration_records(container: Container, config: TenantConfig) -> list[IntegrationRecord]:
    base = container.settings.api_base_url
    common = {
        "redirect_uri": f"{base}/launch/callback",
        "client_id": _client_id(container, config),
        "jwks_url": f"{base}/.well-known/jwks.json",
    }
    return [
        IntegrationRecord(
            type="provider",
            launch_url=f"{base}/launch/provider/{config.id}",
            scopes=list(PROVIDER_LAUNCH_SCOPES),
            **common,
        ),
        IntegrationRecord(
            type="patient",
            launch_url=f"{base}/launch/patient/{config.id}",
            scopes=list(PATIENT_LAUNCH_SCOPES),
            **common,
        ),
        # A plain link for the patient portal (no SMART launch, no scopes, no patient data).
        IntegrationRecord(
            type="device-test", launch_url=f"{base}/device-test/{config.id}", scopes=[], **common
        ),
    ]


def config_view(container: Container, config: TenantConfig) -> ConfigOut:
    approved = config.status.value == "approved"
    return ConfigOut(
        id=config.id,
        tenant_id=config.tenant_id,
        region=config.region,
        fhir_base_url=config.fhir_base_url,
        approver_upn=config.approver_upn,
        environment=config.environment,
        ehr_vendor=config.ehr_vendor,
        smart_client_id=config.smart_client_id,
        provider_landing=config.provider_landing,
        status=config.status,
        created_at=config.created_at,
        created_by=config.created_by,
        updated_at=config.updated_at,
        ehr_validated_at=config.ehr_validated_at,
        ehr_validated_by=config.ehr_validated_by,
        approved_at=config.approved_at,
        approved_by=config.approved_by,
        history=[_change_out(c) for c in config.history],
        integration_records=integration_records(container, config) if approved else None,
        backend_services=BackendServices(
            client_id=_client_id(container, config),
            jwks_url=f"{container.settings.api_base_url}/.well-known/jwks.json",
            scopes=list(BACKEND_SERVICES_SCOPES),
        )
        if approved
        else None,
    )
