"""Project rules that span resources and files, which checkov's per-resource checks cannot see.

Run by infra/check.sh after checkov (inside .venv-infra; pycep-parser is the parser checkov uses
for Bicep)::

    python infra/checkov/connector_rules.py DIR

Each rule prints ``PASSED`` or ``FAILED`` with its id and what it found; exit status 1 if any
rule failed. The rules:

* CKV_CONNECTOR_R1: every storage data role (blob, queue, table) is assigned on a single table,
  queue or blob container, never on the account, a service or a resource group; and the app
  has table, queue and container grants at all (the rule is not vacuous).
* CKV_CONNECTOR_R2: diagnostic settings exist for the storage account, its blob, queue and
  table services, the Key Vault and the Function App.
* CKV_CONNECTOR_R3: main.bicep deploys, when ``privateNetworking`` is on, the virtual network,
  private endpoints for blob, queue, table and vault, and gives the Function App the
  integration subnet.
* CKV_CONNECTOR_R4: main.bicep passes ``privateNetworking`` to the storage and Key Vault
  modules (whose public access CKV_CONNECTOR_11 and 12 tie to it), and scopes the app's roles to
  the same table and queue lists the storage module creates.
* CKV_CONNECTOR_R5: the production parameter files (main.<region>.bicepparam) turn
  ``privateNetworking`` on, and azd's main.parameters.json defaults it to true.

checkov loads every module of this directory looking for checks; this one defines none.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRIVATE = "privateNetworking"
# Built-in storage data roles (Azure RBAC role definition ids).
STORAGE_DATA_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "19e7f393-937e-4f77-808e-94535e297925": "Storage Queue Data Reader",
    "8a0f0c08-91a1-4084-bc3d-661d67233fed": "Storage Queue Data Message Processor",
    "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a": "Storage Queue Data Message Sender",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "76199698-9eea-4c19-bc75-cec21354c6b6": "Storage Table Data Reader",
}
SINGLE_ITEM_TYPES = {
    "Microsoft.Storage/storageAccounts/tableServices/tables": "table",
    "Microsoft.Storage/storageAccounts/queueServices/queues": "queue",
    "Microsoft.Storage/storageAccounts/blobServices/containers": "container",
}
DIAGNOSED_TYPES = (
    "Microsoft.Storage/storageAccounts",
    "Microsoft.Storage/storageAccounts/blobServices",
    "Microsoft.Storage/storageAccounts/queueServices",
    "Microsoft.Storage/storageAccounts/tableServices",
    "Microsoft.KeyVault/vaults",
    "Microsoft.Web/sites",
)
PRIVATE_ENDPOINT_GROUPS = ("blob", "queue", "table", "vault")


@dataclass
class Result:
    rule: str
    title: str
    problems: list[str] = field(default_factory=list)
    found: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str
    condition: Any
    looped: bool
    body: dict[str, Any]


def parse(path: Path) -> dict[str, Any]:
    from pycep import BicepParser

    parsed: dict[str, Any] = BicepParser().parse(text=path.read_text(encoding="utf-8"))
    return parsed


def _unwrap(config: dict[str, Any]) -> tuple[dict[str, Any], Any, bool]:
    """(body, condition, looped) of a resource or module ``config``."""
    condition: Any = None
    looped = False
    while isinstance(config, dict) and isinstance(config.get("config"), dict):
        if "loop_type" in config:
            looped = True
        if config.get("condition") is not None:
            condition = config["condition"]
        config = config["config"]
    return config, condition, looped


def resources(parsed: dict[str, Any]) -> dict[str, Resource]:
    out = {}
    for symbol, resource in (parsed.get("resources") or {}).items():
        body, condition, looped = _unwrap(resource.get("config") or {})
        out[symbol] = Resource(symbol, str(resource.get("type")), condition, looped, body)
    return out


def modules(parsed: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any], Any]]:
    """symbol -> (module path, body, condition)."""
    out = {}
    for symbol, module in (parsed.get("modules") or {}).items():
        body, condition, _ = _unwrap(module.get("config") or {})
        path = str((module.get("detail") or {}).get("path") or "")
        out[symbol] = (path, body, condition)
    return out


def _symbol(expression: Any) -> str | None:
    """The resource symbol an expression names: ``x`` or ``x[i]``."""
    if isinstance(expression, str):
        return expression
    operator = expression.get("operator") if isinstance(expression, dict) else None
    if isinstance(operator, dict) and operator.get("type") == "index_accessor":
        return _symbol((operator.get("operands") or {}).get("operand_1"))
    return None


def _role_id(body: dict[str, Any], variables: dict[str, Any]) -> str | None:
    value = (body.get("properties") or {}).get("roleDefinitionId")
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict):
        return None
    name = (function.get("parameters") or {}).get("resource_name_1")
    if isinstance(name, str):
        return name.lower()
    operator = name.get("operator") if isinstance(name, dict) else None
    if isinstance(operator, dict) and operator.get("type") == "property_accessor":
        operands = operator.get("operands") or {}
        table = (variables.get(str(operands.get("operand_1"))) or {}).get("value")
        if isinstance(table, dict):
            found = table.get(str(operands.get("operand_2")))
            return str(found).lower() if found else None
    return None


def bicep_files(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(root.rglob("*.bicep")):
        yield path, parse(path)


# --- rules -------------------------------------------------------------------------------------


def rule_scoped_data_roles(files: list[tuple[Path, dict[str, Any]]], root: Path) -> Result:
    result = Result(
        "CKV_CONNECTOR_R1", "storage data roles are scoped to single tables, queues and containers"
    )
    kinds: dict[str, int] = {}
    for path, parsed in files:
        found = resources(parsed)
        variables = parsed.get("variables") or {}
        for res in found.values():
            if res.type != "Microsoft.Authorization/roleAssignments":
                continue
            role = _role_id(res.body, variables)
            if role is None:
                result.problems.append(
                    f"{path.relative_to(root)}:{res.symbol}: role not resolvable"
                )
                continue
            if role not in STORAGE_DATA_ROLES:
                continue
            target = found.get(_symbol(res.body.get("scope")) or "")
            kind = SINGLE_ITEM_TYPES.get(target.type) if target else None
            if kind is None:
                where = target.type if target else "the resource group"
                result.problems.append(
                    f"{path.relative_to(root)}:{res.symbol}: {STORAGE_DATA_ROLES[role]} on {where}"
                )
                continue
            kinds[kind] = kinds.get(kind, 0) + 1
    for kind in ("table", "queue", "container"):
        if not kinds.get(kind):
            result.problems.append(f"no storage data role is granted on any {kind}")
    result.found = ", ".join(f"{k}: {n} role assignment(s)" for k, n in sorted(kinds.items()))
    return result


def rule_diagnostics(files: list[tuple[Path, dict[str, Any]]], root: Path) -> Result:
    result = Result(
        "CKV_CONNECTOR_R2",
        "diagnostic settings for storage (account, blob, queue, table), Key Vault and the "
        "Function App",
    )
    covered: set[str] = set()
    for _path, parsed in files:
        found = resources(parsed)
        for res in found.values():
            if res.type != "Microsoft.Insights/diagnosticSettings":
                continue
            target = found.get(_symbol(res.body.get("scope")) or "")
            if target is not None:
                covered.add(target.type)
    for wanted in DIAGNOSED_TYPES:
        if wanted not in covered:
            result.problems.append(f"no diagnostic setting targets a {wanted}")
    result.found = f"{len(covered & set(DIAGNOSED_TYPES))} of {len(DIAGNOSED_TYPES)} resource types"
    return result


def _is_private_condition(condition: Any) -> bool:
    return condition == PRIVATE


def _conditional_on_private(value: Any) -> bool:
    operator = value.get("operator") if isinstance(value, dict) else None
    return (
        isinstance(operator, dict)
        and operator.get("type") == "conditional"
        and (operator.get("operands") or {}).get("condition") == PRIVATE
    )


def rule_private_endpoints(main: dict[str, Any]) -> Result:
    result = Result(
        "CKV_CONNECTOR_R3",
        "privateNetworking deploys the VNet, private endpoints (blob, queue, table, vault) and "
        "the app's VNet integration",
    )
    mods = modules(main)
    groups = {}
    network = False
    for symbol, (path, body, condition) in mods.items():
        if path.endswith("network/virtual-network.bicep"):
            network = _is_private_condition(condition)
            if not network:
                result.problems.append(
                    f"module {symbol} (virtual network) is not conditional on {PRIVATE}"
                )
        if path.endswith("network/private-endpoint.bicep"):
            group = (body.get("params") or {}).get("groupId")
            if not _is_private_condition(condition):
                result.problems.append(f"private endpoint {symbol} is not conditional on {PRIVATE}")
            groups[str(group)] = symbol
    if not network:
        result.problems.append("no virtual network module")
    for group in PRIVATE_ENDPOINT_GROUPS:
        if group not in groups:
            result.problems.append(f"no private endpoint for {group}")
    app = next((b for p, b, _ in mods.values() if p.endswith("app/function-app.bicep")), None)
    subnet = (app or {}).get("params", {}).get("virtualNetworkSubnetId")
    if not _conditional_on_private(subnet):
        result.problems.append(
            f"the Function App's virtualNetworkSubnetId does not follow {PRIVATE}"
        )
    result.found = f"private endpoints: {', '.join(sorted(groups)) or 'none'}"
    return result


def rule_private_flag_and_role_lists(main: dict[str, Any]) -> Result:
    result = Result(
        "CKV_CONNECTOR_R4",
        "privateNetworking reaches storage and Key Vault; roles cover the tables and queues "
        "storage creates",
    )
    mods = modules(main)
    by_path = {p.split("/")[-1]: b.get("params") or {} for p, b, _ in mods.values()}
    for name in ("storage-account.bicep", "key-vault.bicep"):
        if by_path.get(name, {}).get(PRIVATE) != PRIVATE:
            result.problems.append(f"{name} is not given {PRIVATE}")
    storage, rbac = by_path.get("storage-account.bicep", {}), by_path.get("rbac.bicep", {})
    for param in ("tableNames", "queueNames", "hostContainerNames"):
        if not storage.get(param) or storage.get(param) != rbac.get(param):
            result.problems.append(f"storage and rbac modules get different {param}")
    result.found = f"tables: {storage.get('tableNames')}, queues: {storage.get('queueNames')}"
    return result


def _check_parse(root: Path) -> Any:
    here = Path(__file__).resolve().parent.parent / "check_parse.py"
    spec = importlib.util.spec_from_file_location("infra_check_parse", here)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {here}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rule_production_parameters(root: Path) -> Result:
    result = Result("CKV_CONNECTOR_R5", "production parameter files turn privateNetworking on")
    check_parse = _check_parse(root)
    files = sorted(root.glob("main.*.bicepparam"))
    if not files:
        result.problems.append("no main.<region>.bicepparam files")
    for path in files:
        try:
            _using, params = check_parse.parse_bicepparam(path)
        except ValueError as error:
            result.problems.append(f"{path.name}: {error}")
            continue
        if params.get(PRIVATE) != {"kind": "literal", "value": "true"}:
            result.problems.append(f"{path.name} does not set {PRIVATE} = true")
    azd = root / "main.parameters.json"
    if azd.is_file():
        value = json.loads(azd.read_text(encoding="utf-8"))["parameters"].get(PRIVATE, {})
        if not re.fullmatch(r"\$\{[A-Z_]+=true\}", str(value.get("value"))):
            result.problems.append(f"main.parameters.json does not default {PRIVATE} to true")
    result.found = ", ".join(p.name for p in files)
    return result


def run(root: Path) -> list[Result]:
    files = list(bicep_files(root))
    main = next((parsed for path, parsed in files if path == root / "main.bicep"), None)
    results = [rule_scoped_data_roles(files, root), rule_diagnostics(files, root)]
    if main is None:
        results.append(Result("CKV_CONNECTOR_R3", "main.bicep", ["no main.bicep"]))
    else:
        results += [rule_private_endpoints(main), rule_private_flag_and_role_lists(main)]
    results.append(rule_production_parameters(root))
    return results


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "infra")
    try:
        results = run(root)
    except Exception as error:  # a file pycep cannot parse is reported by the parse step
        print(f"ERROR   project rules could not run: {type(error).__name__}: {error}")
        return 1
    for result in results:
        if result.ok:
            print(f"PASSED  {result.rule} {result.title} ({result.found})")
        for problem in result.problems:
            print(f"FAILED  {result.rule} {result.title}: {problem}")
    failed = sum(not r.ok for r in results)
    print(f"project rules: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
