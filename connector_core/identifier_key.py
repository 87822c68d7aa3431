"""The deployment's identifier key: it keys hashed identifiers and does not rotate with sealing.

Visit keys (Graph's ``externalId``), EHR user keys and participant keys are keyed hashes
(``Keyring.keyed_hash``). If they were keyed by the first ``CONNECTOR_SECRET_KEY`` key, a
rotation would give the same appointment a second meeting and orphan every clinician's
mapping. So they are keyed by one identifier key per deployment, stored in the deployment's own
storage *wrapped* (sealed, purpose ``identifier-key``) under the ``CONNECTOR_SECRET_KEY`` keys:

==============  ==================  ========  ==================================================
table           PartitionKey        RowKey    holds
==============  ==================  ========  ==================================================
vv{r}keyring    ``identifier-key``  ``root``  ``Wraps``: JSON ``{key id: {"sealed", "at"}}``
==============  ==================  ========  ==================================================

One entity, updated with its ETag (several instances may start at once). Loading it (once per
process, on the first keyed hash):

1. No entity yet: create it with the oldest listed key's material as the identifier key (with
   one key, the key that keyed identifiers before this existed, so a deployment that upgrades
   keeps every identifier), wrapped under every listed key. A racing instance's insert wins;
   the loser reads it.
2. Open a wrap made by a listed key (the newest first). None: ``SettingsError`` naming the key
   ids the identifier key is wrapped under (put one of those keys back in the list).
3. No wrap under the first listed key yet (a rotation started): add one.
4. Drop wraps under keys that are no longer listed *and* older than the wrap under the first
   key: the rotation they belonged to is over. An instance still on an older list never drops
   the newer wrap (it is younger than its own first key's wrap).

The identifier key itself is never rotated in place: doing so renames every visit, mapping and
participant (docs/operations.md, "The identifier key").
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connector_core.domain.models import Region
from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    NotFoundError,
    RegionMismatchError,
    SettingsError,
)
from connector_core.logs import get_logger, log_event
from connector_core.repositories import table_name

if TYPE_CHECKING:
    from connector_core.crypto import Keyring
    from connector_core.ports import EntityStore

__all__ = ["PURPOSE", "IdentifierKeyStore"]

PURPOSE = "identifier-key"
_PARTITION = "identifier-key"
_ROW = "root"
_ATTEMPTS = 5
_log = get_logger("keys")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class IdentifierKeyStore:
    """Loads (and creates once) the identifier key of a region's deployment."""

    def __init__(self, store: EntityStore, *, region: Region) -> None:
        self._store = store
        self._region = region
        self.table = table_name(region, "keyring")

    def load(self, keyring: Keyring) -> bytes:
        """The identifier key, wrapped under ``keyring``'s first key from now on (see above).

        Logs ``keys.loaded`` with the listed key ids once per process: operators see which key
        list every instance runs with (docs/operations.md)."""
        root = self._load(keyring)
        log_event(
            _log,
            "keys.loaded",
            active_key_id=keyring.active_key_id,
            key_ids=",".join(keyring.key_ids),
        )
        return root

    def _load(self, keyring: Keyring) -> bytes:
        for _ in range(_ATTEMPTS):
            try:
                entity, etag = self._store.get_entity(self.table, _PARTITION, _ROW)
            except NotFoundError:
                root = keyring.legacy_identifier_root()
                try:
                    self._store.create_entity(
                        self.table,
                        self._entity(
                            {kid: self._wrap(keyring, root, kid) for kid in keyring.key_ids}
                        ),
                    )
                except ConflictError:
                    continue  # another instance created it first: use theirs
                log_event(_log, "keys.identifier_key.created", key_id=keyring.active_key_id)
                return root
            if entity.get("Region") != self._region.value:
                raise RegionMismatchError("The identifier key belongs to another region.")
            wraps: dict[str, dict[str, str]] = json.loads(str(entity.get("Wraps") or "{}"))
            root = self._open(keyring, wraps)
            wanted = self._maintained(keyring, wraps, root)
            if wanted == wraps:
                return root
            try:
                self._store.update_entity(self.table, self._entity(wanted), etag=etag)
            except ConcurrencyConflictError:
                continue  # someone else updated it: read again
            log_event(
                _log,
                "keys.identifier_key.rewrapped",
                key_ids=",".join(sorted(wanted)),
                dropped=",".join(sorted(set(wraps) - set(wanted))) or "-",
            )
            return root
        raise ConcurrencyConflictError("The identifier key kept changing; try again.")

    # --- internals --------------------------------------------------------------------------
    def _entity(self, wraps: dict[str, dict[str, str]]) -> dict[str, Any]:
        return {
            "PartitionKey": _PARTITION,
            "RowKey": _ROW,
            "Kind": "identifier-key",
            "Region": self._region.value,
            "Wraps": json.dumps(wraps, separators=(",", ":"), sort_keys=True),
        }

    @staticmethod
    def _wrap(keyring: Keyring, root: bytes, kid: str) -> dict[str, str]:
        payload = {"key": base64.b64encode(root).decode()}
        return {"sealed": keyring.seal(PURPOSE, payload, with_key=kid), "at": _now()}

    @staticmethod
    def _open(keyring: Keyring, wraps: dict[str, dict[str, str]]) -> bytes:
        for kid in keyring.key_ids:
            wrap = wraps.get(kid)
            if wrap is not None:
                payload = keyring.unseal(PURPOSE, wrap["sealed"])
                return base64.b64decode(payload["key"])
        log_event(
            _log,
            "keys.identifier_key.unreadable",
            level=logging.CRITICAL,
            listed=",".join(keyring.key_ids),
            wrapped_under=",".join(sorted(wraps)) or "-",
        )
        raise SettingsError(
            "CONNECTOR_SECRET_KEY",
            "holds none of the keys the deployment's identifier key is wrapped under (key ids "
            f"{', '.join(sorted(wraps)) or 'none'}); add one of them back to the list",
        )

    def _maintained(
        self, keyring: Keyring, wraps: dict[str, dict[str, str]], root: bytes
    ) -> dict[str, dict[str, str]]:
        wanted = dict(wraps)
        first = keyring.active_key_id
        if first not in wanted:
            wanted[first] = self._wrap(keyring, root, first)
        newest = wanted[first]["at"]
        listed = set(keyring.key_ids)
        for kid, wrap in wraps.items():
            if kid not in listed and wrap.get("at", "") < newest:
                del wanted[kid]
        return wanted
