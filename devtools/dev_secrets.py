"""Generate development key material and a ``local.settings.json`` for local runs.

``python -m devtools.dev_secrets`` writes ``local.settings.json`` (gitignored) from
``local.settings.sample.json`` with fresh values for the secret settings, unless it exists.
Never use these values in Azure: there, Key Vault holds real secrets.

Rehearsing a ``CONNECTOR_SECRET_KEY`` rotation locally (docs/operations.md):

    python -m devtools.dev_secrets --stage-secret-key     # [old] -> [old, new]
    python -m devtools.dev_secrets --promote-secret-key   # [old, new] -> [new, old]
    python -m devtools.dev_secrets --retire-secret-keys   # [new, old] -> [new]

Each prints the key ids (never the keys); restart the connector after each step.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "dev_secret_settings",
    "new_rsa_private_key_pem",
    "new_secret_key",
    "new_self_signed_cert",
    "new_self_signed_cert_pem",
    "rotate_secret_key",
]


def new_rsa_private_key_pem(bits: int = 2048) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def new_self_signed_cert(
    common_name: str, *, days: int = 365
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A fresh RSA 2048 key and a self-signed certificate for it (dev and test material)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def new_self_signed_cert_pem(common_name: str = "vv-connector-notifications") -> str:
    """A self-signed certificate followed by its private key, both PEM (Graph encryption)."""
    key, cert = new_self_signed_cert(common_name)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode() + key_pem


def new_secret_key() -> str:
    """One ``CONNECTOR_SECRET_KEY`` key: 32 random bytes, base64."""
    return base64.b64encode(os.urandom(32)).decode()


def rotate_secret_key(value: str, step: str) -> str:
    """``CONNECTOR_SECRET_KEY`` after one rotation step: ``stage`` appends a new key (listed,
    not yet sealing), ``promote`` moves the last key to the front (it seals from now on),
    ``retire`` keeps only the first key."""
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if step == "stage":
        keys.append(new_secret_key())
    elif step == "promote":
        if len(keys) < 2:
            raise ValueError("nothing to promote: stage a new key first")
        keys.insert(0, keys.pop())
    elif step == "retire":
        keys = keys[:1]
    else:
        raise ValueError(f"unknown step {step!r}")
    return ",".join(keys)


def _key_ids(value: str) -> str:
    from connector_core.crypto import key_id

    return ", ".join(key_id(base64.b64decode(k)) for k in value.split(",") if k.strip())


def dev_secret_settings() -> dict[str, str]:
    return {
        "CONNECTOR_SECRET_KEY": new_secret_key(),
        "SMART_PRIVATE_KEY": new_rsa_private_key_pem(),
        "GRAPH_NOTIFICATION_CERT": new_self_signed_cert_pem(),
    }


def write_local_settings(path: Path, *, force: bool = False) -> bool:
    if path.exists() and not force:
        return False
    sample = json.loads((REPO_ROOT / "local.settings.sample.json").read_text())
    sample["Values"].update(dev_secret_settings())
    path.write_text(json.dumps(sample, indent=2) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", type=Path, default=REPO_ROOT / "local.settings.json")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    step = parser.add_mutually_exclusive_group()
    for name, what in (
        ("stage", "append a new CONNECTOR_SECRET_KEY key (opens, does not seal yet)"),
        ("promote", "make the last CONNECTOR_SECRET_KEY key the first (it seals)"),
    ):
        step.add_argument(
            f"--{name}-secret-key", dest="step", action="store_const", const=name, help=what
        )
    step.add_argument(
        "--retire-secret-keys",
        dest="step",
        action="store_const",
        const="retire",
        help="keep only the first CONNECTOR_SECRET_KEY key",
    )
    args = parser.parse_args(argv)
    if args.step:
        data = json.loads(args.path.read_text())
        before = data["Values"]["CONNECTOR_SECRET_KEY"]
        after = rotate_secret_key(before, args.step)
        data["Values"]["CONNECTOR_SECRET_KEY"] = after
        args.path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"CONNECTOR_SECRET_KEY key ids: {_key_ids(before)} -> {_key_ids(after)}")
        print("restart the connector to use them")
        return 0
    if write_local_settings(args.path, force=args.force):
        print(f"wrote {args.path}")
    else:
        print(f"{args.path} exists; left unchanged (use --force to regenerate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
