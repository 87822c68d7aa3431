from __future__ import annotations

from datetime import timedelta

import pytest

from connector_core.domain.models import (
    ConfigStatus,
    Environment,
    Region,
    TenantConfig,
    utcnow,
)
from connector_core.errors import InvalidStateError


def new_config(**overrides: object) -> TenantConfig:
    now = utcnow()
    values: dict[str, object] = {
        "id": "cfg1",
        "tenant_id": "tid-1",
        "region": Region.AMERICAS,
        "fhir_base_url": "https://ehr.example/fhir/r4",
        "approver_upn": "Analyst@Contoso.example",
        "environment": Environment.TEST,
        "created_at": now,
        "created_by": "admin@contoso.example",
        "updated_at": now,
    }
    values.update(overrides)
    return TenantConfig.model_validate(values)


def test_approval_needs_recent_ehr_signin_by_the_approver() -> None:
    config = new_config()
    now = utcnow()
    with pytest.raises(InvalidStateError):
        config.approve(by="analyst@contoso.example", at=now)
    signed = config.record_ehr_signin(by="ANALYST@contoso.example", at=now)
    approved = signed.approve(by="analyst@contoso.example", at=now + timedelta(minutes=29))
    assert approved.status is ConfigStatus.APPROVED
    assert [c.action for c in approved.history] == ["ehr_signin", "approved"]


def test_stale_signin_cannot_approve() -> None:
    now = utcnow()
    signed = new_config().record_ehr_signin(by="analyst@contoso.example", at=now)
    with pytest.raises(InvalidStateError):
        signed.approve(by="analyst@contoso.example", at=now + timedelta(minutes=31))


def test_only_the_approver_signs_in_and_approves() -> None:
    now = utcnow()
    with pytest.raises(InvalidStateError):
        new_config().record_ehr_signin(by="someone@contoso.example", at=now)
    signed = new_config().record_ehr_signin(by="analyst@contoso.example", at=now)
    with pytest.raises(InvalidStateError):
        signed.approve(by="admin@contoso.example", at=now)


def test_a_change_sends_the_config_back_for_approval() -> None:
    now = utcnow()
    approved = (
        new_config()
        .record_ehr_signin(by="analyst@contoso.example", at=now)
        .approve(by="analyst@contoso.example", at=now)
    )
    unchanged = approved.change(by="admin", at=now, environment=Environment.TEST)
    assert unchanged is approved
    changed = approved.change(by="admin", at=now, environment=Environment.PRODUCTION)
    assert changed.status is ConfigStatus.PENDING_APPROVAL
    assert changed.ehr_validated_at is None and changed.approved_at is None
    assert changed.history[-1].fields == ("environment",)
    with pytest.raises(InvalidStateError):
        changed.approve(by="analyst@contoso.example", at=now)
