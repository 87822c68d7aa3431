"""infra/check.sh (make infra-check) passes on the real templates and fails on broken ones.

Each test here runs checkov once (about 10 s warm; the first run bootstraps .venv-infra).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import CheckRun, run_check

pytestmark = [pytest.mark.infra, pytest.mark.timeout(900)]


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not found in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_real_infra_passes(real_infra_check: CheckRun) -> None:
    out = real_infra_check.output
    assert real_infra_check.returncode == 0, out
    assert "infra-check: OK" in out
    summary = re.search(
        r"checkov: (\d+) passed, (\d+) failed, (\d+) skipped, (\d+) parsing error", out
    )
    assert summary, out
    passed, failed, skipped, parsing = map(int, summary.groups())
    assert failed == 0 and parsing == 0
    assert passed >= 30
    # The project's own checks ran (external checks dir loaded).
    assert "0 problem(s)" in out
    assert not re.search(r"FAILED\s+CKV_CONNECTOR_", out)  # checkov prints failures only
    assert re.search(r"project rules: 5 passed, 0 failed", out), out
    # Every skip printed with its justification.
    assert out.count("SKIPPED ") == skipped
    assert out.count("why: ") == skipped


def test_syntax_errors_fail_and_name_the_files(infra_copy: Path) -> None:
    # A broken module: checkov alone would only list it under parsing_errors and exit 0.
    _replace(
        infra_copy / "core" / "security" / "key-vault.bicep",
        "    enableRbacAuthorization: true\n",
        "    enableRbacAuthorization: true\n    enablePurgeProtection: = \n",
    )
    # A broken parameter file (bare word instead of a string).
    _replace(
        infra_copy / "main.apac.bicepparam",
        "param location = 'australiaeast'",
        "param location = australiaeast",
    )

    result = run_check(infra_copy)

    assert result.returncode != 0, result.output
    assert "infra-check: FAILED" in result.output
    assert re.search(r"key-vault\.bicep: Bicep parse error", result.output), result.output
    assert re.search(r"checkov could not parse .*key-vault\.bicep", result.output), result.output
    assert re.search(r"main\.apac\.bicepparam: bicepparam parse error: line \d+", result.output), (
        result.output
    )


def test_insecure_settings_and_unjustified_skips_fail_naming_the_checks(infra_copy: Path) -> None:
    storage = infra_copy / "core" / "storage" / "storage-account.bicep"
    _replace(storage, "allowSharedKeyAccess: false", "allowSharedKeyAccess: true")
    _replace(storage, "minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'")
    app = infra_copy / "app" / "function-app.bicep"
    _replace(app, "httpsOnly: true", "httpsOnly: false")
    # A skip without a justification, hiding an insecure Key Vault setting.
    vault = infra_copy / "core" / "security" / "key-vault.bicep"
    _replace(vault, "    enablePurgeProtection: true\n", "    enablePurgeProtection: false\n")
    _replace(vault, "  name: name\n", "  //checkov:skip=CKV_AZURE_110\n  name: name\n")

    result = run_check(infra_copy)
    out = result.output

    assert result.returncode != 0, out
    assert re.search(r"FAILED\s+CKV_CONNECTOR_1 /core/storage/storage-account\.bicep", out), out
    assert re.search(r"FAILED\s+CKV_AZURE_44 /core/storage/storage-account\.bicep", out), out
    assert re.search(r"FAILED\s+CKV_AZURE_14 /app/function-app\.bicep", out), out
    assert re.search(
        r"key-vault\.bicep:\d+: checkov skip without a check id and a justification", out
    ), out
    assert "skip without justification: CKV_AZURE_110" in out, out


def test_network_logging_and_role_scope_rules_fail_naming_the_rule(infra_copy: Path) -> None:
    storage = infra_copy / "core" / "storage" / "storage-account.bicep"
    _replace(
        storage,
        "publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'",
        "publicNetworkAccess: 'Enabled'",
    )
    # Table logs moved off the table service: the table service has no diagnostic setting.
    _replace(
        storage,
        "  scope: tableServices\n  properties: {\n    workspaceId",
        "  scope: storage\n  properties: {\n    workspaceId",
    )
    vault = infra_copy / "core" / "security" / "key-vault.bicep"
    _replace(vault, "defaultAction: privateNetworking ? 'Deny' : 'Allow'", "defaultAction: 'Allow'")
    app = infra_copy / "app" / "function-app.bicep"
    _replace(
        app,
        "    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId\n",
        "",
    )
    _replace(app, "category: 'FunctionAppLogs'", "category: 'AppServiceHTTPLogs'")
    # A table role on the whole account.
    _replace(infra_copy / "app" / "rbac.bicep", "  scope: tables[i]\n", "  scope: storage\n")
    # No private endpoint for Key Vault, and a production region left public.
    _replace(infra_copy / "main.bicep", "    groupId: 'vault'\n", "    groupId: 'blob'\n")
    _replace(
        infra_copy / "main.apac.bicepparam",
        "param privateNetworking = true",
        "param privateNetworking = false",
    )

    result = run_check(infra_copy)
    out = result.output

    assert result.returncode != 0, out
    for check, where in (
        ("CKV_CONNECTOR_11", "/core/storage/storage-account.bicep"),
        ("CKV_CONNECTOR_12", "/core/security/key-vault.bicep"),
        ("CKV_CONNECTOR_13", "/app/function-app.bicep"),
        ("CKV_CONNECTOR_14", "/app/function-app.bicep"),
    ):
        assert re.search(rf"FAILED\s+{check} {re.escape(where)}", out), (check, out)
    assert re.search(
        r"FAILED\s+CKV_CONNECTOR_R1 .*Storage Table Data Contributor on Microsoft\.Storage/storageAccounts",
        out,
    ), out
    assert re.search(
        r"FAILED\s+CKV_CONNECTOR_R2 .*no diagnostic setting targets a Microsoft\.Storage/storageAccounts/tableServices",
        out,
    ), out
    assert re.search(r"FAILED\s+CKV_CONNECTOR_R3 .*no private endpoint for vault", out), out
    assert re.search(
        r"FAILED\s+CKV_CONNECTOR_R5 .*main\.apac\.bicepparam does not set privateNetworking = true",
        out,
    ), out
    assert re.search(r"project rules: \d+ passed, 4 failed", out), out
