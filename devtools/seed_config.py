"""An approved tenant config for a sandbox EHR, written straight through the repository.

Used where the portal flow itself is not what is being exercised: ``make run`` (so the demo's
launch buttons work at once), the benchmarks and the launch/presence test fixtures. The
portal API's own tests go through HTTP.
"""

from __future__ import annotations

import uuid

from connector_core.bootstrap import Container
from connector_core.domain.models import (
    EhrVendor,
    Environment,
    ProviderLanding,
    TenantConfig,
    utcnow,
)

__all__ = ["SANDBOX_APPROVER", "add_approved_config"]

SANDBOX_APPROVER = "approver@sandbox.example"


def add_approved_config(
    container: Container,
    *,
    tenant_id: str,
    fhir_base_url: str,
    vendor: EhrVendor = EhrVendor.SMART,
    environment: Environment = Environment.TEST,
    approver: str = SANDBOX_APPROVER,
    created_by: str = "devtools",
    endpoint_hosts: tuple[str, ...] | None = None,
    provider_landing: ProviderLanding = ProviderLanding.MEETING,
    config_id: str | None = None,
) -> TenantConfig:
    """Create the config, record the approver's EHR sign-in and approve it, as the portal would.

    The URL is checked like the portal checks it (``FhirProbe``), which also records the
    allowance for the EHR's endpoints on other hosts; pass ``endpoint_hosts`` to skip that for
    an EHR that is not running. ``provider_landing``: straight into the meeting unless asked
    (the tests and benches written before the visit page expect that; ``make run`` asks for it).
    ``config_id``: a fixed id (``make run`` keeps its ids across runs); random by default.
    """
    from connector_core.service.configs import endpoint_allowance

    if endpoint_hosts is None:
        report = container.fhir_probe.probe(fhir_base_url)
        fhir_base_url, endpoint_hosts = report.fhir_base_url, endpoint_allowance(report)
    now = utcnow()
    config = TenantConfig(
        id=config_id or uuid.uuid4().hex,
        tenant_id=tenant_id,
        region=container.settings.region,
        fhir_base_url=fhir_base_url,
        ehr_endpoint_hosts=endpoint_hosts,
        approver_upn=approver,
        environment=environment,
        ehr_vendor=vendor,
        provider_landing=provider_landing,
        created_at=now,
        created_by=created_by,
        updated_at=now,
    )
    config = config.record_ehr_signin(by=approver, at=now).approve(by=approver, at=now)
    container.configs.add(config)
    return config
