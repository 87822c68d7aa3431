"""Which CONNECTOR_SECRET_KEY keys stored values still need: count sealed values per key id.

Before retiring a key (the last step of a rotation, docs/operations.md), check that nothing the
connector stored is still sealed with it::

    python -m devtools.key_usage --region emea --account-url https://<account>.table.core.windows.net
    python -m devtools.key_usage --region emea --retire 3f9a12c0   # exit 1 while any value needs it

It reads the region's tables (``vv{region}*``) and, in every entity, each property whose name
contains ``sealed`` (also inside the JSON ``Record``): visits' EHR references, subscriptions'
clientState secrets, the identifier key's wraps. A sealed value names its key in its header
(``connector_core.crypto``); values sealed before key ids existed count as ``legacy`` (they open
under any listed key that made them). Nothing is decrypted and no value is printed: only table
names, key ids and counts. Visit records are purged ``CONNECTOR_RETENTION_DAYS`` after their visit;
until then they keep their key in use.

Storage: ``--connection-string`` (or the ``CONNECTOR_STORAGE`` setting), or ``--account-url`` with
your Azure sign-in (DefaultAzureCredential; the identity needs "Storage Table Data Reader" on the
tables, and with private networking on, a network path to the account).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from connector_core.crypto import sealed_key_id

__all__ = ["count_sealed", "main", "table_service", "usage"]

LEGACY = "legacy"


def _sealed_values(value: Any, *, under_sealed_name: bool = False) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _sealed_values(item, under_sealed_name="sealed" in str(key).lower())
    elif isinstance(value, list):
        for item in value:
            yield from _sealed_values(item, under_sealed_name=under_sealed_name)
    elif isinstance(value, str):
        if under_sealed_name:
            yield value
        elif value[:1] in ("{", "["):
            try:
                parsed = json.loads(value)
            except ValueError:
                return
            yield from _sealed_values(parsed)


def count_sealed(entities: Iterable[dict[str, Any]]) -> Counter[str]:
    """Sealed values per key id (``legacy`` for values without one) in ``entities``."""
    counts: Counter[str] = Counter()
    for entity in entities:
        for token in _sealed_values(dict(entity)):
            try:
                kid = sealed_key_id(token)
            except ValueError:
                continue
            counts[kid or LEGACY] += 1
    return counts


def table_service(connection_string: str | None, account_url: str | None) -> Any:
    from azure.data.tables import TableServiceClient

    if account_url:
        from azure.identity import DefaultAzureCredential

        return TableServiceClient(endpoint=account_url, credential=DefaultAzureCredential())
    if not connection_string:
        raise SystemExit("give --connection-string, --account-url or set CONNECTOR_STORAGE")
    return TableServiceClient.from_connection_string(connection_string)


def usage(service: Any, region: str) -> dict[str, Counter[str]]:
    """Per table of the region: sealed values per key id."""
    prefix = f"vv{region}"
    result: dict[str, Counter[str]] = {}
    for table in service.list_tables():
        if not str(table.name).startswith(prefix):
            continue
        client = service.get_table_client(table.name)
        result[str(table.name)] = count_sealed(client.list_entities())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--region", required=True, choices=("americas", "emea", "apac"))
    parser.add_argument("--connection-string", default=os.environ.get("CONNECTOR_STORAGE"))
    parser.add_argument("--account-url", default=None, help="https://<account>.table.core...")
    parser.add_argument(
        "--retire", metavar="KEY_ID", default=None, help="exit 1 while any value needs this key"
    )
    args = parser.parse_args(argv)
    per_table = usage(table_service(args.connection_string, args.account_url), args.region)
    total: Counter[str] = Counter()
    for table, counts in sorted(per_table.items()):
        total.update(counts)
        shown = ", ".join(f"{kid}: {n}" for kid, n in sorted(counts.items())) or "none"
        print(f"{table}: {shown}")
    print("all tables: " + (", ".join(f"{k}: {n}" for k, n in sorted(total.items())) or "none"))
    if args.retire:
        needed = total.get(args.retire.lower(), 0)
        legacy = total.get(LEGACY, 0)
        if needed or legacy:
            print(
                f"key {args.retire} may still be needed: {needed} value(s) name it, {legacy} "
                "legacy value(s) name no key (sealed by the key in use before key ids existed); "
                "keep it listed until they are purged"
            )
            return 1
        print(f"no stored value needs key {args.retire}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
