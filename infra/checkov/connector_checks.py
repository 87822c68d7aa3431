"""Project checks that checkov's built-in Bicep/ARM policies do not cover.

Loaded by infra/check.sh with ``checkov --external-checks-dir infra/checkov``. Each check pins a
setting the connector's security model relies on (DESIGN.md, issue 7): Entra-only storage,
no anonymous blobs, blob soft delete, Key Vault in RBAC mode, Application Insights without
local keys, no basic-auth publishing, and identity-based storage connections.
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
]
