"""CONNECTOR_SECRET_KEY rotation: key ids in sealed values, several keys, legacy values, and the
identifier key that keeps visit keys, mappings and participants stable across a rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from connector_core.adapters.memory import InMemoryEntityStore
from connector_core.crypto import Keyring, key_id, sealed_key_id
from connector_core.domain.models import GraphSubscription, Region
from connector_core.errors import (
    AuthenticationError,
    KeyUnavailableError,
    SettingsError,
    UnknownKeyError,
)
from connector_core.identifier_key import IdentifierKeyStore
from connector_core.service.subscriptions import client_state_of
from connector_core.settings import Settings
from tests.helpers import make_environ

K1, K2, K3 = (os.urandom(32) for _ in range(3))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def legacy_seal(key: bytes, purpose: str, payload: dict[str, object]) -> str:
    """A value as the connector sealed it before key ids (format 0x01), byte for byte."""
    prk = hmac.new(b"\x00" * 32, key, hashlib.sha256).digest()
    subkey = hmac.new(prk, f"seal:{purpose}".encode() + b"\x01", hashlib.sha256).digest()
    nonce = os.urandom(12)
    body = json.dumps(payload, separators=(",", ":")).encode()
    raw = b"\x01" + nonce + AESGCM(subkey).encrypt(nonce, body, purpose.encode())
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def legacy_keyed_hash(key: bytes, purpose: str, *parts: str) -> str:
    """A keyed hash as the connector computed it before rotation existed."""
    import struct

    prk = hmac.new(b"\x00" * 32, key, hashlib.sha256).digest()
    subkey = hmac.new(prk, f"hash:{purpose}".encode() + b"\x01", hashlib.sha256).digest()
    mac = hmac.new(subkey, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(struct.pack(">I", len(part.encode())) + part.encode())
    return mac.hexdigest()[:32]


# --- sealing --------------------------------------------------------------------------------------


def test_sealed_values_name_the_sealing_key_by_an_8_hex_digit_id() -> None:
    ring = Keyring([K2, K1])
    assert ring.key_ids == (key_id(K2), key_id(K1))
    assert ring.active_key_id == key_id(K2)
    assert all(len(kid) == 8 and int(kid, 16) >= 0 for kid in ring.key_ids)
    token = ring.seal("launch-state", {"a": 1})
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw[0] == 0x02 and raw[1:5].hex() == key_id(K2)
    assert sealed_key_id(token) == key_id(K2)
    assert key_id(K2) not in token  # the id is binary inside base64url, not the key
    with pytest.raises(ValueError):
        sealed_key_id("not-sealed")


def test_every_listed_key_opens_what_it_sealed() -> None:
    old, staged, promoted, retired = (
        Keyring([K1]),
        Keyring([K1, K2]),
        Keyring([K2, K1]),
        Keyring(K2),
    )
    by_old = old.seal("client-state", {"clientState": "s1"})
    by_promoted = promoted.seal("client-state", {"clientState": "s2"})
    # Old and promoted instances accept each other's state through the staged step ...
    assert promoted.unseal("client-state", by_old) == {"clientState": "s1"}
    assert staged.unseal("client-state", by_promoted) == {"clientState": "s2"}
    assert staged.unseal("client-state", by_old) == {"clientState": "s1"}
    assert promoted.unseal("client-state", staged.seal("client-state", {"x": 1})) == {"x": 1}
    # ... an instance that never listed the new key cannot, and says which key it lacks.
    with pytest.raises(UnknownKeyError) as caught:
        old.unseal("client-state", by_promoted)
    assert caught.value.extra["keyId"] == key_id(K2)
    assert isinstance(caught.value, AuthenticationError)
    # Once the old key is dropped, what only it sealed no longer opens.
    with pytest.raises(UnknownKeyError):
        retired.unseal("client-state", by_old)


def test_values_sealed_before_key_ids_still_open_under_any_listed_key() -> None:
    legacy = legacy_seal(K1, "visit-context", {"patient": "Patient/1"})
    assert sealed_key_id(legacy) is None
    assert Keyring(K1).unseal("visit-context", legacy) == {"patient": "Patient/1"}
    assert Keyring([K2, K1]).unseal("visit-context", legacy) == {"patient": "Patient/1"}
    with pytest.raises(AuthenticationError):
        Keyring([K2, K3]).unseal("visit-context", legacy)
    with pytest.raises(AuthenticationError):
        Keyring([K2, K1]).unseal("launch-state", legacy)  # purpose still bound


def test_the_key_id_is_authenticated_not_just_a_hint() -> None:
    ring = Keyring([K2, K1])
    token = ring.seal("p", {"x": 1})
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[1:5] = bytes.fromhex(key_id(K1))  # claim the other listed key
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(AuthenticationError) as caught:
        ring.unseal("p", forged)
    assert not isinstance(caught.value, UnknownKeyError)


def test_a_keyring_refuses_short_repeated_or_too_many_keys() -> None:
    with pytest.raises(SettingsError):
        Keyring([K1, b"short"])
    with pytest.raises(SettingsError, match="repeats"):
        Keyring([K1, K2, K1])
    with pytest.raises(SettingsError):
        Keyring([os.urandom(32) for _ in range(9)])
    with pytest.raises(SettingsError):
        Keyring([])


# --- settings -------------------------------------------------------------------------------------


def test_connector_secret_key_lists_keys_newest_first() -> None:
    env = make_environ(CONNECTOR_SECRET_KEY=f" {_b64(K2)} ,{_b64(K1)},")
    settings = Settings.from_environ(env)
    assert settings.secret_keys == (K2, K1)
    assert settings.secret_key_bytes == K2
    single = Settings.from_environ(make_environ(CONNECTOR_SECRET_KEY=_b64(K1)))
    assert single.secret_keys == (K1,)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"{_b64(K1)},%%%", "key 2: must be base64"),
        (f"{_b64(K1)},c2hvcnQ=", "key 2: must hold at least 32 bytes"),
        (f"{_b64(K1)},,{_b64(K2)}", "key 2: is empty"),
        (f"{_b64(K1)},{_b64(K1)}", "key 2 repeats key 1"),
        (",", "at least one"),
        (",".join(_b64(os.urandom(32)) for _ in range(9)), "more than 8"),
    ],
    ids=["not-base64", "short", "empty", "repeated", "none", "too-many"],
)
def test_bad_key_lists_name_the_setting_and_the_key(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(make_environ(CONNECTOR_SECRET_KEY=value))
    assert caught.value.setting == "CONNECTOR_SECRET_KEY"
    assert message in str(caught.value)
    assert _b64(K1) not in str(caught.value)  # never echo key material


# --- the identifier key ---------------------------------------------------------------------------


def ring(store: InMemoryEntityStore, *keys: bytes) -> Keyring:
    return Keyring(list(keys), identifier_root=IdentifierKeyStore(store, region=Region.EMEA).load)


def wraps(store: InMemoryEntityStore) -> dict[str, dict[str, str]]:
    entity, _ = store.get_entity("vvemeakeyring", "identifier-key", "root")
    assert entity["Region"] == "emea"
    loaded: dict[str, dict[str, str]] = json.loads(entity["Wraps"])
    return loaded


def test_identifiers_stay_stable_across_a_whole_rotation_and_match_the_old_ones() -> None:
    store = InMemoryEntityStore()
    parts = ("visit", "cfg-1", "appointment", "A-1")
    before = legacy_keyed_hash(K1, *parts)  # what a deployment computed before this change
    assert ring(store, K1).keyed_hash(*parts) == before
    assert set(wraps(store)) == {key_id(K1)}
    # Stage, promote, retire: the same visit key, EHR user key and participant keys throughout.
    for keys in ([K1, K2], [K2, K1], [K2]):
        fresh = ring(store, *keys)  # a new process with that list
        assert fresh.keyed_hash(*parts) == before
        assert fresh.keyed_hash("ehr-user", "https://ehr/fhir", "Practitioner/1") == (
            legacy_keyed_hash(K1, "ehr-user", "https://ehr/fhir", "Practitioner/1")
        )
    # The retired key's wrap is gone; the identifier key is now wrapped only under K2.
    assert set(wraps(store)) == {key_id(K2)}
    # An unrelated deployment (another store) gets other identifiers.
    assert ring(InMemoryEntityStore(), K3).keyed_hash(*parts) != before


def test_instances_on_old_and_new_lists_share_the_identifier_key_during_the_switch() -> None:
    store = InMemoryEntityStore()
    ring(store, K1).identifier_root()
    promoted = ring(store, K2, K1)
    root = promoted.identifier_root()
    assert set(wraps(store)) == {key_id(K1), key_id(K2)}
    # An instance that still runs the old list starts now: it neither fails nor drops K2's wrap.
    assert ring(store, K1).identifier_root() == root
    assert set(wraps(store)) == {key_id(K1), key_id(K2)}
    # A rollback to a list that never held K2 and no longer holds K1 cannot read it: it says so.
    with pytest.raises(SettingsError) as caught:
        ring(store, K3).identifier_root()
    assert key_id(K1) in str(caught.value) and key_id(K2) in str(caught.value)


def test_a_wrap_of_an_abandoned_rotation_is_dropped_by_the_next_one() -> None:
    store = InMemoryEntityStore()
    ring(store, K1).identifier_root()
    ring(store, K2, K1).identifier_root()  # rotation to K2 started ...
    ring(store, K1).identifier_root()  # ... and rolled back (K2 still wrapped: harmless)
    ring(store, K3, K1).identifier_root()  # a new rotation to K3
    assert set(wraps(store)) == {key_id(K1), key_id(K3)}


def test_first_start_of_many_instances_at_once_agrees_on_one_identifier_key() -> None:
    store = InMemoryEntityStore()
    barrier = threading.Barrier(8)
    roots: list[bytes] = []
    errors: list[BaseException] = []

    def start(keys: list[bytes]) -> None:
        try:
            barrier.wait()
            roots.append(ring(store, *keys).identifier_root())
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [
        threading.Thread(target=start, args=([K2, K1] if i % 2 else [K1],)) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(roots)) == 1
    assert set(wraps(store)) <= {key_id(K1), key_id(K2)}


def test_the_wrap_timestamps_are_comparable_iso_times() -> None:
    store = InMemoryEntityStore()
    ring(store, K1).identifier_root()
    at = wraps(store)[key_id(K1)]["at"]
    assert datetime.fromisoformat(at).tzinfo == UTC
    assert len(at) == len("2025-01-01T00:00:00.000000+00:00")


# --- a genuine notification is never dropped for a key this instance lacks -------------------------


def test_client_state_sealed_by_a_newer_instance_is_a_503_not_a_drop() -> None:
    from tests.helpers import in_memory_container

    newer = Keyring([K2, K1])
    older = in_memory_container(CONNECTOR_SECRET_KEY=_b64(K1))
    now = datetime.now(UTC)
    record = GraphSubscription(
        subscription_id="sub-1",
        region=older.settings.region,
        visit_key="v" * 32,
        tenant_id="t",
        client_state_sealed=newer.seal("client-state", {"clientState": "abc.def"}),
        expires_at=now,
        created_at=now,
    )
    with pytest.raises(KeyUnavailableError) as caught:
        client_state_of(older, record)
    assert caught.value.http_status == 503
    staged = in_memory_container(CONNECTOR_SECRET_KEY=f"{_b64(K1)},{_b64(K2)}")
    assert client_state_of(staged, record) == "abc.def"


def test_dev_secrets_rehearse_the_three_rotation_steps() -> None:
    from devtools.dev_secrets import rotate_secret_key

    old = _b64(K1)
    staged = rotate_secret_key(old, "stage")
    first, new = staged.split(",")
    assert first == old and len(base64.b64decode(new)) == 32
    promoted = rotate_secret_key(staged, "promote")
    assert promoted == f"{new},{old}"
    assert rotate_secret_key(promoted, "retire") == new
    with pytest.raises(ValueError):
        rotate_secret_key(old, "promote")
    for value in (staged, promoted):
        assert Settings.from_environ(make_environ(CONNECTOR_SECRET_KEY=value)).secret_keys


def test_key_usage_counts_stored_sealed_values_per_key_id_without_opening_them() -> None:
    from devtools.key_usage import count_sealed

    promoted = Keyring([K2, K1])
    visit = {
        "PartitionKey": "v" * 32,
        "Record": json.dumps(
            {"visit_key": "v" * 32, "sealed_context": promoted.seal("visit-context", {"p": 1})}
        ),
    }
    old_visit = {"Record": json.dumps({"sealed_context": legacy_seal(K1, "visit-context", {})})}
    sub = {
        "Record": json.dumps({"client_state_sealed": Keyring(K1).seal("client-state", {})}),
        "RowKey": "sub",
    }
    noise = {"Record": json.dumps({"join_url": "https://x", "state": "AQAAAAAAAAAAAAAAAAAAAAAA"})}
    counts = count_sealed([visit, old_visit, sub, noise])
    assert counts == {key_id(K2): 1, key_id(K1): 1, "legacy": 1}
