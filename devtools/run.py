"""``make run``: Azurite + the sandbox (EHR, Entra ID, Graph/Teams) + the connector, as a live demo.

Seeds one approved connector config per sandbox EHR profile (default SMART, Epic, Oracle Health)
and prints the sandbox EHR page to open (click "Start virtual visit" as clinician or patient in
any profile's table), the configuration portal with the account to pick for each of its personas
(admin, approver, admin who is also the approver, a user with no role), the connector URL and a
portal token for trying the configuration API. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devtools.sandbox import Sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent


def portal_url(public_url: str) -> str:
    return f"{public_url}/api/portal"


def _connector_env(
    public_url: str, storage: str, sandbox_settings: dict[str, str]
) -> dict[str, str]:
    from devtools.dev_secrets import write_local_settings

    settings_file = REPO_ROOT / "local.settings.json"
    if write_local_settings(settings_file):
        print(f"wrote {settings_file.name} with fresh development keys")
    values: dict[str, str] = json.loads(settings_file.read_text())["Values"]
    return {
        **{k: str(v) for k, v in values.items()},
        "CONNECTOR_PUBLIC_URL": public_url,
        "CONNECTOR_STORAGE": storage,
        "CONNECTOR_DEV_MODE": "1",
        # The approver's EHR sign-in returns to the portal's page.
        "CONNECTOR_PORTAL_URL": portal_url(public_url),
        **sandbox_settings,
    }


def _seed_config(fhir_base: str, tenant_id: str, approver: str, vendor: str) -> str:
    """An approved config for a sandbox EHR profile, so the demo's launch buttons work at once."""
    from connector_core.bootstrap import get_container
    from connector_core.domain.models import EhrVendor, Environment
    from devtools.seed_config import add_approved_config

    container = get_container()
    existing = container.configs.find_id_by_url(tenant_id, Environment.TEST.value, fhir_base)
    if existing:
        return existing
    config = add_approved_config(
        container,
        tenant_id=tenant_id,
        fhir_base_url=fhir_base,
        vendor=EhrVendor(vendor),
        approver=approver,
        created_by="make-run-seed",
    )
    return config.id


def persona_lines(sandbox: Sandbox, tenant_id: str) -> str:
    """One line per portal persona: its name, the account to pick, what it does."""
    from devtools.sandbox.entra import PORTAL_PERSONAS

    lines = []
    for name, what in PORTAL_PERSONAS.items():
        upn = sandbox.entra.persona(name, tenant_id).upn
        lines.append(f"    {name:<15} {upn:<44} {what}\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.run", description=__doc__)
    parser.add_argument("--port", type=int, default=7071, help="connector port (default 7071)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The Azure SDK logs every storage request at INFO; keep the demo's console readable.
    logging.getLogger("azure").setLevel(logging.WARNING)

    from devtools.azurite import Azurite
    from devtools.sandbox import Sandbox

    public_url = f"http://127.0.0.1:{args.port}"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    with (
        Azurite() as azurite,
        Sandbox(
            connector_url=public_url,
            state_dir=REPO_ROOT / ".run",
            portal_redirect_uris=(f"{portal_url(public_url)}/signin-callback",),
        ) as sandbox,
    ):
        env = _connector_env(public_url, azurite.connection_string, sandbox.connector_settings())
        os.environ.update(env)

        from connector_core.settings import Settings

        Settings.from_environ()  # fail fast, naming the bad setting

        import function_app
        from devtools.host import LocalHost

        with LocalHost(function_app.app, port=args.port):
            tenant = next(iter(sandbox.entra.tenants.values()))
            users = sandbox.entra.users_in(tenant.tid)
            approver = next((u.upn for u in users if u.kind == "approver"), users[0].upn)
            admin = next((u.upn for u in users if u.kind == "admin"), users[0].upn)
            profiles = []
            for profile in sandbox.ehr.profiles:  # default, epic, oracle: one config each
                profile.config_id = _seed_config(
                    profile.fhir_base, tenant.tid, approver, profile.vendor
                )
                profiles.append(
                    f"    {profile.name:<8} {profile.label}  (ehrVendor {profile.vendor})\n"
                    f"             config {profile.config_id}\n"
                    f"             FHIR base {profile.fhir_base}\n"
                    f"             issuer    {profile.issuer}\n"
                )
            token = sandbox.entra.mint_user_token(admin)
            personas = persona_lines(sandbox, tenant.tid)
            print(
                "\n"
                "  EHR virtual-visit connector: local demo\n"
                f'  Open the sandbox EHR and click "Start virtual visit":  {sandbox.ehr_url}/\n'
                f"  Connector:      {public_url}/api/health\n"
                f"  Sandbox EHR profiles (approved configs, tenant {tenant.name}):\n"
                f"{''.join(profiles)}"
                f"  Configuration portal:  {portal_url(public_url)}\n"
                '  Click "Sign in with Microsoft", then pick the account of the persona:\n'
                f"{personas}"
                f"  Entra (HTTPS):  {sandbox.entra_url}   Graph/Teams: {sandbox.graph_url}\n"
                '  Portal API:     curl -H "Authorization: Bearer $TOKEN" '
                f"{public_url}/api/configs\n"
                f"                  export TOKEN={token}\n"
                "  Ctrl-C stops everything.\n",
                flush=True,
            )
            stop.wait()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
