"""Static tests of infra/ that need no checkov: parameter files, app settings, azd wiring."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import INFRA, REPO_ROOT

REGIONS = ("americas", "emea", "apac")

# DESIGN.md section 4, as of this writing; the test also reads the live document when present.
DESIGN_SETTINGS = {
    "CONNECTOR_REGION",
    "CONNECTOR_PUBLIC_URL",
    "CONNECTOR_STORAGE",
    "CONNECTOR_SECRET_KEY",
    "CONNECTOR_DEV_MODE",
    "CONNECTOR_PORTAL_URL",
    "ENTRA_AUTHORITY_HOST",
    "ENTRA_CLIENT_ID",
    "ENTRA_CLIENT_SECRET",
    "ENTRA_API_AUDIENCE",
    "GRAPH_BASE_URL",
    "SMART_CLIENT_ID",
    "SMART_PRIVATE_KEY",
    "GRAPH_NOTIFICATION_CERT",
}
KEY_VAULT_SETTINGS = {
    "CONNECTOR_SECRET_KEY": "connector-secret-key",
    "SMART_PRIVATE_KEY": "smart-private-key",
    "GRAPH_NOTIFICATION_CERT": "graph-notification-cert",
    "ENTRA_CLIENT_SECRET": "entra-client-secret",
}


def _load_check_parse() -> ModuleType:
    spec = importlib.util.spec_from_file_location("infra_check_parse", INFRA / "check_parse.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_parse = _load_check_parse()


def _design_settings() -> set[str]:
    """Setting names of the design's section 4 (shared/ beside the repo, else docs/design.md)."""
    design = REPO_ROOT.parent / "shared" / "DESIGN.md"  # the live contract, where present
    if not design.is_file():
        design = REPO_ROOT / "docs" / "design.md"  # the repository's copy
    if not design.is_file():
        return set(DESIGN_SETTINGS)
    text = design.read_text(encoding="utf-8")
    section = re.search(r"^## 4\..*?$(.*?)^## 5\.", text, re.S | re.M)
    assert section, "DESIGN.md has no section 4"
    names: set[str] = set()
    for line in section.group(1).splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    assert names, "no settings found in DESIGN.md section 4"
    return names | DESIGN_SETTINGS


def _app_settings() -> dict[str, str]:
    """Keys and raw values of the appsettings resource of infra/app/function-app.bicep."""
    text = (INFRA / "app" / "function-app.bicep").read_text(encoding="utf-8")
    block = re.search(
        r"^resource appSettings 'Microsoft\.Web/sites/config@[^']+' = \{\n(.*?)^\}",
        text,
        re.S | re.M,
    )
    assert block, "appSettings resource not found"
    props = block.group(1).split("  properties: {\n", 1)[1]
    settings = {}
    for line in props.splitlines():
        m = re.match(r"^    ([A-Za-z_][A-Za-z0-9_]*): (.+)$", line)
        if m:
            settings[m.group(1)] = m.group(2).strip()
    return settings


def _params(region: str) -> dict[str, dict[str, Any]]:
    using, params = check_parse.parse_bicepparam(INFRA / f"main.{region}.bicepparam")
    assert using == "./main.bicep"
    return params


def test_three_parameter_files_differ_only_in_region_and_location() -> None:
    files = sorted(p.name for p in INFRA.glob("main.*.bicepparam"))
    assert files == sorted(f"main.{r}.bicepparam" for r in REGIONS)
    params = {r: _params(r) for r in REGIONS}
    for region, values in params.items():
        assert values["region"] == {"kind": "literal", "value": f"'{region}'"}
        assert values["location"]["kind"] == "literal"
    locations = {values["location"]["value"] for values in params.values()}
    assert len(locations) == 3, "each region gets its own Azure location"

    def rest(values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in values.items() if k not in ("region", "location")}

    assert rest(params["americas"]) == rest(params["emea"]) == rest(params["apac"])
    assert rest(params["americas"]), "the shared parameters are read from the environment"


def test_parameter_files_name_declared_params_and_allowed_regions() -> None:
    main = (INFRA / "main.bicep").read_text(encoding="utf-8")
    declared = set(re.findall(r"^param (\w+) ", main, re.M))
    allowed = re.search(r"@allowed\(\[\n((?:\s+'\w+'\n)+)\s*\]\)\nparam region string", main)
    assert allowed, "region parameter must be restricted with @allowed"
    assert set(re.findall(r"'(\w+)'", allowed.group(1))) == set(REGIONS)
    assert "targetScope = 'subscription'" in main
    for region in REGIONS:
        assert set(_params(region)) <= declared


def test_every_design_setting_is_an_app_setting() -> None:
    settings = _app_settings()
    for name in sorted(_design_settings()):
        if name == "CONNECTOR_STORAGE":
            # Identity-based in Azure (DESIGN.md section 4): no connection string.
            assert "CONNECTOR_STORAGE" not in settings
            assert "CONNECTOR_STORAGE__tableServiceUri" in settings
            assert "CONNECTOR_STORAGE__queueServiceUri" in settings
            assert settings["CONNECTOR_STORAGE__credential"] == "'managedidentity'"
        else:
            assert name in settings, f"{name} missing from the Function App settings"


def test_settings_values_are_region_identity_and_key_vault_based() -> None:
    settings = _app_settings()
    assert settings["CONNECTOR_REGION"] == "region"
    assert settings["CONNECTOR_DEV_MODE"] == "'0'"
    for name, secret in KEY_VAULT_SETTINGS.items():
        assert settings[name].startswith("'@Microsoft.KeyVault("), name
        assert f"SecretName={secret})" in settings[name], name
    for name in (
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
    ):
        assert name in settings
    assert "AzureWebJobsStorage" not in settings
    joined = "\n".join(settings.values())
    assert "AccountKey" not in joined and "listKeys" not in joined


def test_role_assignments_are_least_privilege_and_guid_named() -> None:
    rbac = (INFRA / "app" / "rbac.bicep").read_text(encoding="utf-8")
    for role_id in (
        "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor
        "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Storage Queue Data Contributor
        "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner
        "ba92f5b4-2d11-453d-a403-e96b0029c9fe",  # Storage Blob Data Contributor
        "4633458b-17de-408a-b874-0445c86b69e6",  # Key Vault Secrets User
        "3913510d-42f4-4e42-8a64-420c390055eb",  # Monitoring Metrics Publisher
    ):
        assert role_id in rbac
    assignments = re.findall(
        r"^resource (\w+) 'Microsoft\.Authorization/roleAssignments@[^']+' = "
        r"(?:\[for [^\n]+?: )?(?:if \(.*\) )?\{\n  name: (.+)\n  scope: (.+)$",
        rbac,
        re.M,
    )
    assert len(assignments) == 8
    assert all(name.startswith("guid(") for _, name, _ in assignments)
    scopes = {symbol: scope for symbol, _, scope in assignments}
    # Storage data roles on single tables, queues and containers, never the account.
    assert scopes["tableContributor"] == "tables[i]"
    assert scopes["queueContributor"] == "queues[i]"
    assert scopes["hostBlobOwner"] == "hostContainers[i]"
    assert scopes["packageContributor"] == "deploymentContainer"
    assert scopes["operatorQueueContributor"] == "operatorQueues[i]"
    assert "storage" not in scopes.values()
    # Never subscription- or resource-group-wide owner/contributor roles.
    for broad in ("8e3af657-a8ff-443c-a75c-2fe8c4bcb635", "b24988ac-6180-42a0-ab88-20f7382dd24c"):
        assert broad not in rbac


def _bicep_list(text: str, name: str) -> list[str]:
    block = re.search(rf"^var {name} = \[\n(.*?)^\]", text, re.S | re.M)
    assert block, f"var {name} not found"
    return re.findall(r"^\s+'([^']+)'$", block.group(1), re.M)


def _code_table_kinds() -> set[str]:
    """Table kinds the connector reads and writes: ``table_name(region, "<kind>")``, the
    repositories' ``kind="<kind>", model=...`` and a module's ``TABLE_KIND = "<kind>"``,
    anywhere in connector_core."""
    kinds: set[str] = set()
    for path in (REPO_ROOT / "connector_core").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        kinds.update(re.findall(r"table_name\(\s*[\w.]+\s*,\s*\"(\w+)\"\s*\)", text))
        kinds.update(re.findall(r"kind=\"(\w+)\",\s*model=", text))
        kinds.update(re.findall(r"^TABLE_KIND = \"(\w+)\"", text, re.M))  # a named kind
    return kinds


def test_infra_creates_and_grants_exactly_the_tables_and_queues_the_code_uses() -> None:
    """Roles are scoped per table and queue, so a table or queue the code starts using must be
    added to infra/main.bicep (connectorTableKinds, connectorQueues), and one it stops using
    removed; otherwise the app gets a 403 in Azure that no local test sees."""
    import connector_core.queues as queues

    main = (INFRA / "main.bicep").read_text(encoding="utf-8")
    assert set(_bicep_list(main, "connectorTableKinds")) == _code_table_kinds()
    code_queues = {
        value
        for name, value in vars(queues).items()
        if name.isupper() and name.endswith("QUEUE") and isinstance(value, str)
    }
    assert code_queues, "connector_core/queues.py names no queues"
    # The Functions host moves a trigger queue's failed messages to "<queue>-poison".
    code_queues |= {f"{q}-poison" for q in code_queues if not q.endswith("-poison")}
    assert set(_bicep_list(main, "connectorQueues")) == code_queues
    assert "tableNames: connectorTables" in main and "queueNames: connectorQueues" in main


def test_azd_project_wiring() -> None:
    azure_yaml = (REPO_ROOT / "azure.yaml").read_text(encoding="utf-8")
    assert re.search(
        r"^infra:\n  provider: bicep\n  path: infra\n  module: main$", azure_yaml, re.M
    )
    assert re.search(
        r"^  api:\n    project: \.\n    language: python\n    host: function$", azure_yaml, re.M
    )
    params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert params["region"]["value"] == "${CONNECTOR_REGION}"
    assert params["location"]["value"] == "${AZURE_LOCATION}"
    main = (INFRA / "main.bicep").read_text(encoding="utf-8")
    declared = set(re.findall(r"^param (\w+) ", main, re.M))
    assert set(params) <= declared
    app = (INFRA / "app" / "function-app.bicep").read_text(encoding="utf-8")
    assert "'azd-service-name': 'api'" in app
    for hook in ("preprovision.sh", "postprovision.sh", "prepackage.sh"):
        assert (INFRA / "hooks" / hook).is_file()
    assert re.search(
        r"^    hooks:\n      prepackage:\n.*\n        run: infra/hooks/prepackage.sh$",
        azure_yaml,
        re.M,
    )


def test_the_package_carries_hash_checked_bytecode(tmp_path: Path) -> None:
    """The prepackage hook compiles the app's code to bytecode Python trusts whatever the files'
    times in the package, and .funcignore lets it into the package."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(INFRA / "hooks", tmp_path / "infra" / "hooks")
    shutil.copy(REPO_ROOT / "function_app.py", tmp_path)
    for name in ("functions", "connector_core"):
        shutil.copytree(
            REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        ["sh", str(tmp_path / "infra" / "hooks" / "prepackage.sh")],
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
    )
    compiled = list((tmp_path / "connector_core").rglob("*.pyc"))
    sources = list((tmp_path / "connector_core").rglob("*.py"))
    assert len(compiled) == len(sources)
    assert list((tmp_path / "__pycache__").glob("function_app.*.pyc"))
    for pyc in compiled:
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b11, pyc  # hash-based, checked (PEP 552)
    ignored = (REPO_ROOT / ".funcignore").read_text(encoding="utf-8").split()
    assert "__pycache__" not in ignored


def test_flex_consumption_python_311_with_parameters() -> None:
    app = (INFRA / "app" / "function-app.bicep").read_text(encoding="utf-8")
    assert "tier: 'FlexConsumption'" in app and "name: 'FC1'" in app
    assert re.search(r"runtime: \{\n\s+name: 'python'\n\s+version: '3.11'", app)
    assert "instanceMemoryMB: instanceMemoryMB" in app
    assert "maximumInstanceCount: maximumInstanceCount" in app
    # open visit pages each keep one async request in flight: not one instance per page
    assert re.search(
        r"triggers: \{\n\s+http: \{\n\s+perInstanceConcurrency: httpPerInstanceConcurrency", app
    )
    assert re.search(r"^param httpPerInstanceConcurrency int = 16$", app, re.M)
    assert (
        "ftpsState: 'Disabled'" in app
        and "minTlsVersion: '1.2'" in app
        and "httpsOnly: true" in app
    )
    storage = (INFRA / "core" / "storage" / "storage-account.bicep").read_text(encoding="utf-8")
    for setting in (
        "allowSharedKeyAccess: false",
        "allowBlobPublicAccess: false",
        "minimumTlsVersion: 'TLS1_2'",
        "deleteRetentionPolicy",
        "containerDeleteRetentionPolicy",
    ):
        assert setting in storage
    vault = (INFRA / "core" / "security" / "key-vault.bicep").read_text(encoding="utf-8")
    assert "enableRbacAuthorization: true" in vault and "enablePurgeProtection: true" in vault


@pytest.mark.parametrize(
    "text",
    [
        "param region = 'emea'\n",  # no using
        "using './main.bicep'\nparam region = emea\n",  # bare word
        "using './main.bicep'\nparam region = 'emea\n",  # unterminated string
        "using './main.bicep'\nparam region = 'emea'\nparam region = 'apac'\n",  # twice
        "using './main.bicep'\nparam x = readEnvironmentVariable(NAME)\n",  # unquoted name
        "using './main.bicep'\nvar x = 1\n",  # unsupported statement
        "using './main.bicep'\n/* open comment\n",
    ],
)
def test_bicepparam_parser_is_strict(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.bicepparam"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError):
        check_parse.parse_bicepparam(path)


def test_bicepparam_parser_accepts_the_supported_subset(tmp_path: Path) -> None:
    path = tmp_path / "x.bicepparam"
    path.write_text(
        "// comment\nusing './main.bicep' // trailing\n\n/* block\ncomment */\n"
        "param a = 'it\\'s // not a comment'\nparam b = 42\nparam c = true\n"
        "param d = readEnvironmentVariable('D')\nparam e = readEnvironmentVariable('E', 'x')\n",
        encoding="utf-8",
    )
    using, params = check_parse.parse_bicepparam(path)
    assert using == "./main.bicep"
    assert params["b"] == {"kind": "literal", "value": "42"}
    assert params["d"] == {"kind": "env", "name": "D", "default": None}
    assert params["e"] == {"kind": "env", "name": "E", "default": "'x'"}
    assert set(params) == {"a", "b", "c", "d", "e"}
