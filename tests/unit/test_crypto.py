from __future__ import annotations

import base64
import hashlib
import os

import jwt
import pytest

from connector_core.crypto import Keyring, SigningKeys, new_pkce_pair, random_token
from connector_core.errors import AuthenticationError, SettingsError
from devtools.dev_secrets import new_rsa_private_key_pem


def test_seal_round_trip_and_purpose_binding() -> None:
    ring = Keyring(os.urandom(32))
    token = ring.seal("launch-state", {"a": 1}, ttl_seconds=60)
    assert ring.unseal("launch-state", token) == {"a": 1}
    with pytest.raises(AuthenticationError):
        ring.unseal("ehr-signin-state", token)
    with pytest.raises(AuthenticationError):
        Keyring(os.urandom(32)).unseal("launch-state", token)


def test_tampered_and_expired_seals_are_refused() -> None:
    ring = Keyring(os.urandom(32))
    token = ring.seal("p", {"x": "y"}, ttl_seconds=10)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-1] ^= 1
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(AuthenticationError):
        ring.unseal("p", forged)
    with pytest.raises(AuthenticationError):
        ring.unseal("p", "not-a-token")
    import time

    with pytest.raises(AuthenticationError):
        ring.unseal("p", token, now=time.time() + 11)


def test_keyed_hash_is_deterministic_keyed_and_unambiguous() -> None:
    key = os.urandom(32)
    a = Keyring(key).keyed_hash("visit", "cfg", "Appointment/1")
    assert a == Keyring(key).keyed_hash("visit", "cfg", "Appointment/1")
    assert a != Keyring(os.urandom(32)).keyed_hash("visit", "cfg", "Appointment/1")
    assert Keyring(key).keyed_hash("visit", "ab", "c") != Keyring(key).keyed_hash(
        "visit", "a", "bc"
    )
    assert Keyring(key).keyed_hash("user", "cfg", "Appointment/1") != a
    assert len(a) == 32


def test_pkce_pair_is_s256() -> None:
    verifier, challenge = new_pkce_pair()
    expected = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    assert challenge == expected
    assert 43 <= len(verifier) <= 128
    assert random_token() != random_token()


def test_signing_keys_rotation_and_client_assertion() -> None:
    old, new = new_rsa_private_key_pem(), new_rsa_private_key_pem()
    keys = SigningKeys.from_pem_bundle(new + "\n" + old)
    jwks = keys.jwks()
    assert len(jwks["keys"]) == 2
    assert jwks["keys"][0]["kid"] == keys.active_kid
    assertion = keys.client_assertion(client_id="cid", audience="https://ehr/token")
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == "RS384"
    assert header["kid"] == keys.active_kid
    public = jwt.PyJWK(jwks["keys"][0]).key
    claims = jwt.decode(assertion, public, algorithms=["RS384"], audience="https://ehr/token")
    assert claims["iss"] == claims["sub"] == "cid"
    assert claims["exp"] - claims["iat"] <= 300
    assert "d" not in jwks["keys"][0]
    with pytest.raises(SettingsError):
        SigningKeys.from_pem_bundle("no key here")
