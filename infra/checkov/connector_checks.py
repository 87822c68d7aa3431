"""Project checks that checkov's built-in Bicep/ARM policies do not cover.

Loaded by infra/check.sh with ``checkov --external-checks-dir infra/checkov``. Each check pins a
setting the connector's security model relies on (docs/design.md, issues 7 and 14): Entra-only
storage, no anonymous blobs, blob soft delete, Key Vault in RBAC mode, Application Insights
without local keys, no basic-auth publishing, identity-based storage connections; public network
access of storage and Key Vault off whenever ``privateNetworking`` is on, the Function App
VNet-integrated then, and diagnostic settings that reach Log Analytics without HTTP access logs
(query strings). Rules that span several resources or files (role scopes, which resources have
diagnostic settings and private endpoints, the production parameter files) are in
``connector_rules.py``, run by check.sh after checkov.
"""

from __future__ import annotations

from typing import Any

from checkov.bicep.checks.resource.base_resource_check import BaseResourceCheck
from checkov.common.models.enums import CheckCategories, CheckResult
from checkov.common.util.data_structures_utils import find_in_dict


class _ExactValueCheck(BaseResourceCheck):
    """Passes only when ``key`` is present and equal to ``expected`` (a missing key fails)."""

    def __init__(
        self,
        *,
        id: str,
        name: str,
        resource: str,
        key: str,
        expected: Any,
        category: CheckCategories = CheckCategories.GENERAL_SECURITY,
    ) -> None:
        self._key = key
        self._expected = expected
        super().__init__(name=name, id=id, categories=(category,), supported_resources=(resource,))

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        self.evaluated_keys = [self._key]
        value = find_in_dict(conf, self._key)
        if isinstance(value, str) and isinstance(self._expected, str):
            return (
                CheckResult.PASSED
                if value.lower() == self._expected.lower()
                else CheckResult.FAILED
            )
        return CheckResult.PASSED if value == self._expected else CheckResult.FAILED


PRIVATE_NETWORKING_PARAM = "privateNetworking"


def _config(conf: dict[str, Any]) -> dict[str, Any]:
    """The resource body, also for a conditional (``= if (...)``) or looped resource."""
    inner = conf.get("config")
    if isinstance(inner, dict) and ("condition" in conf or "loop_type" in conf):
        return _config(inner)
    return conf


def off_when_private(value: Any, off: str) -> bool:
    """``value`` is ``off`` outright, or ``privateNetworking ? off : <anything>``."""
    if isinstance(value, str):
        return value.lower() == off.lower()
    operator = value.get("operator") if isinstance(value, dict) else None
    if not isinstance(operator, dict) or operator.get("type") != "conditional":
        return False
    operands = operator.get("operands") or {}
    true_value = operands.get("true_value")
    return (
        operands.get("condition") == PRIVATE_NETWORKING_PARAM
        and isinstance(true_value, str)
        and true_value.lower() == off.lower()
    )


class _PublicAccessOffWhenPrivate(BaseResourceCheck):
    """Public network access ``Disabled`` and firewall default action ``Deny`` whenever the
    ``privateNetworking`` parameter is on (checkov's own checks cannot read the conditional)."""

    def __init__(self, *, id: str, name: str, resource: str) -> None:
        super().__init__(
            name=name,
            id=id,
            categories=(CheckCategories.NETWORKING,),
            supported_resources=(resource,),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        props = _config(conf).get("properties")
        if not isinstance(props, dict):
            return CheckResult.FAILED
        self.evaluated_keys = ["properties/publicNetworkAccess", "properties/networkAcls"]
        acls = props.get("networkAcls")
        default_action = acls.get("defaultAction") if isinstance(acls, dict) else None
        if off_when_private(props.get("publicNetworkAccess"), "Disabled") and off_when_private(
            default_action, "Deny"
        ):
            return CheckResult.PASSED
        return CheckResult.FAILED


class _FunctionAppVnetIntegrated(BaseResourceCheck):
    """The site takes its VNet integration subnet (``virtualNetworkSubnetId``) from a parameter:
    main.bicep passes the app subnet whenever ``privateNetworking`` is on."""

    def __init__(self) -> None:
        super().__init__(
            name="Connector: Function App is VNet-integrated when private networking is on",
            id="CKV_CONNECTOR_13",
            categories=(CheckCategories.NETWORKING,),
            supported_resources=("Microsoft.Web/sites",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        props = _config(conf).get("properties")
        self.evaluated_keys = ["properties/virtualNetworkSubnetId"]
        value = props.get("virtualNetworkSubnetId") if isinstance(props, dict) else None
        if value is None or value == "":
            return CheckResult.FAILED
        return CheckResult.PASSED


# Categories that carry full request URLs (query strings: code, state, launch, iss) or everything.
_URL_LOG_CATEGORIES = {"appservicehttplogs"}
_BROAD_GROUPS = {"alllogs"}


class _DiagnosticsToLogAnalytics(BaseResourceCheck):
    """Every diagnostic setting sends to the Log Analytics workspace, enables at least one log
    category or metric, and never the HTTP access logs (or the allLogs group that includes them)."""

    def __init__(self) -> None:
        super().__init__(
            name="Connector: diagnostic settings go to Log Analytics, without HTTP access logs",
            id="CKV_CONNECTOR_14",
            categories=(CheckCategories.LOGGING,),
            supported_resources=("Microsoft.Insights/diagnosticSettings",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        props = _config(conf).get("properties")
        if not isinstance(props, dict) or not props.get("workspaceId"):
            return CheckResult.FAILED
        self.evaluated_keys = ["properties/workspaceId", "properties/logs", "properties/metrics"]
        enabled = 0
        for entry in [*(props.get("logs") or []), *(props.get("metrics") or [])]:
            if not isinstance(entry, dict) or entry.get("enabled") is not True:
                continue
            category = str(entry.get("category") or "").lower()
            group = str(entry.get("categoryGroup") or "").lower()
            if category in _URL_LOG_CATEGORIES or group in _BROAD_GROUPS:
                return CheckResult.FAILED
            enabled += 1
        return CheckResult.PASSED if enabled else CheckResult.FAILED


class _AppSettingsIdentityBased(BaseResourceCheck):
    """App settings carry no storage connection strings or account keys."""

    def __init__(self) -> None:
        super().__init__(
            name="Connector: identity-based storage connections, no keys in app settings",
            id="CKV_CONNECTOR_8",
            categories=(CheckCategories.SECRETS,),
            supported_resources=("Microsoft.Web/sites/config",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        if conf.get("name") not in (None, "appsettings"):
            return CheckResult.UNKNOWN
        props = conf.get("properties")
        if not isinstance(props, dict):
            return CheckResult.UNKNOWN
        self.evaluated_keys = ["properties"]
        for name in ("AzureWebJobsStorage", "CONNECTOR_STORAGE"):
            if name in props:
                return CheckResult.FAILED
        for value in props.values():
            text = str(value)
            if "AccountKey=" in text or "SharedAccessSignature=" in text or "listKeys(" in text:
                return CheckResult.FAILED
        return CheckResult.PASSED


checks = [
    _ExactValueCheck(
        id="CKV_CONNECTOR_1",
        name="Connector: storage account disallows shared key (account key / SAS) access",
        resource="Microsoft.Storage/storageAccounts",
        key="properties/allowSharedKeyAccess",
        expected=False,
        category=CheckCategories.IAM,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_2",
        name="Connector: storage account disallows anonymous blob access",
        resource="Microsoft.Storage/storageAccounts",
        key="properties/allowBlobPublicAccess",
        expected=False,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_3",
        name="Connector: blob soft delete is enabled",
        resource="Microsoft.Storage/storageAccounts/blobServices",
        key="properties/deleteRetentionPolicy/enabled",
        expected=True,
        category=CheckCategories.BACKUP_AND_RECOVERY,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_4",
        name="Connector: container soft delete is enabled",
        resource="Microsoft.Storage/storageAccounts/blobServices",
        key="properties/containerDeleteRetentionPolicy/enabled",
        expected=True,
        category=CheckCategories.BACKUP_AND_RECOVERY,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_5",
        name="Connector: Key Vault uses Azure RBAC, not access policies",
        resource="Microsoft.KeyVault/vaults",
        key="properties/enableRbacAuthorization",
        expected=True,
        category=CheckCategories.IAM,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_6",
        name="Connector: Application Insights disables local (instrumentation key) authentication",
        resource="Microsoft.Insights/components",
        key="properties/DisableLocalAuth",
        expected=True,
        category=CheckCategories.IAM,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_7",
        name="Connector: basic-auth publishing credentials (FTP / SCM) are disabled",
        resource="Microsoft.Web/sites/basicPublishingCredentialsPolicies",
        key="properties/allow",
        expected=False,
        category=CheckCategories.IAM,
    ),
    _AppSettingsIdentityBased(),
    _ExactValueCheck(
        id="CKV_CONNECTOR_9",
        name="Connector: storage account requires TLS 1.2",
        resource="Microsoft.Storage/storageAccounts",
        key="properties/minimumTlsVersion",
        expected="TLS1_2",
        category=CheckCategories.ENCRYPTION,
    ),
    _ExactValueCheck(
        id="CKV_CONNECTOR_10",
        name="Connector: Function App is HTTPS only",
        resource="Microsoft.Web/sites",
        key="properties/httpsOnly",
        expected=True,
        category=CheckCategories.ENCRYPTION,
    ),
    _PublicAccessOffWhenPrivate(
        id="CKV_CONNECTOR_11",
        name="Connector: storage public network access is off whenever private networking is on",
        resource="Microsoft.Storage/storageAccounts",
    ),
    _PublicAccessOffWhenPrivate(
        id="CKV_CONNECTOR_12",
        name="Connector: Key Vault public network access is off whenever private networking is on",
        resource="Microsoft.KeyVault/vaults",
    ),
    _FunctionAppVnetIntegrated(),
    _DiagnosticsToLogAnalytics(),
]
