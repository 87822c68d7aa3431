"""``make run``: Azurite + the sandbox (EHR, Entra ID, Graph/Teams) + the connector, as a live demo.

Seeds one approved connector config per sandbox EHR profile (default SMART, Epic, Oracle Health)
and prints the sandbox EHR page to open (click "Start virtual visit" as clinician or patient in
any profile's table), the configuration portal with the account to pick for each of its personas
(admin, approver, admin who is also the approver, a user with no role), the connector URL and a
portal token for trying the configuration API. Ctrl-C stops everything.

The URLs stay the same from run to run, so bookmarks keep working: the sandbox listens on fixed
ports (:data:`DEFAULT_PORTS`; ``--ehr-port`` / ``VV_EHR_PORT`` and the like change them, and a
busy port falls back to a free one with a message) and each profile's config id is derived from
``--config-seed`` (``VV_CONFIG_SEED``), the tenant and the profile (:func:`seeded_config_id`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devtools.sandbox import Sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent
# The sandbox's ports when free (the connector's is --port, 7071).
DEFAULT_PORTS: dict[str, int] = {"ehr": 7080, "entra": 7443, "graph": 7090}
DEFAULT_CONFIG_SEED = "make-run"
_CONFIG_NAMESPACE = uuid.UUID("0b6f3c1e-9a57-4d2e-8f41-5c7a2e9d6b30")


def seeded_config_id(seed: str, tenant_id: str, profile: str) -> str:
    """The config id ``make run`` gives a sandbox profile: the same seed, tenant and profile
    give the same id on every run (a UUID5, hex like the portal's ids)."""
    return uuid.uuid5(_CONFIG_NAMESPACE, f"{seed}/{tenant_id}/{profile}").hex


def choose_port(preferred: int, what: str, flag: str) -> int:
    """``preferred`` if it can be bound on 127.0.0.1 now, else 0 (a free port), saying so."""
    if preferred == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            print(
                f"port {preferred} for the {what} is busy; using a free port instead "
                f"(choose one with {flag}); bookmarks of earlier runs will not match",
                flush=True,
            )
            return 0
    return preferred


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


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


def _seed_config(fhir_base: str, tenant_id: str, approver: str, vendor: str, config_id: str) -> str:
    """An approved config for a sandbox EHR profile, so the demo's launch buttons work at once."""
    from connector_core.bootstrap import get_container
    from connector_core.domain.models import EhrVendor, Environment, ProviderLanding
    from connector_core.errors import ConnectorError
    from devtools.seed_config import add_approved_config

    container = get_container()
    existing = container.configs.find_id_by_url(tenant_id, Environment.TEST.value, fhir_base)
    if existing == config_id:
        return existing
    if existing:  # this URL under another id (an older run): the seeded id wins
        container.configs.delete(tenant_id, existing)
    with contextlib.suppress(ConnectorError):  # the seeded id under an older URL
        container.configs.delete(tenant_id, config_id)
    config = add_approved_config(
        container,
        tenant_id=tenant_id,
        fhir_base_url=fhir_base,
        vendor=EhrVendor(vendor),
        approver=approver,
        created_by="make-run-seed",
        config_id=config_id,
        provider_landing=ProviderLanding.VISIT_PAGE,  # the walkthrough's visit page
    )
    return config.id


def _seed_reports(tenant_id: str, config_id: str, users: Sequence[Any]) -> str:
    """Synthetic visit summaries (marked: ``synthetic``, departments ``SYNTHETIC-n``) for the
    last three weeks, organized by the sandbox's clinicians; the same rows on every run."""
    from datetime import UTC, datetime

    from connector_core.bootstrap import get_container
    from devtools.bench_reports import synthetic_summaries

    clinicians = tuple(u.oid for u in users if u.kind == "clinician")
    rows = synthetic_summaries(
        tenant_id,
        count=21 * 12,
        last_day=datetime.now(UTC).date(),
        days=21,
        config_id=config_id,
        organizers=clinicians,
    )
    get_container().reports.put_many(rows)
    return (
        f"  Reports: {len(rows)} SYNTHETIC visits of the last 21 days were written (departments "
        "SYNTHETIC-1..5):\n"
        f"    {portal_url(get_container().settings.public_url)}/reports (admin or auditor)\n"
    )


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
    for name, env_name in (
        ("ehr", "VV_EHR_PORT"),
        ("entra", "VV_ENTRA_PORT"),
        ("graph", "VV_GRAPH_PORT"),
    ):
        default = _env_port(env_name, DEFAULT_PORTS[name])
        parser.add_argument(
            f"--{name}-port",
            type=int,
            default=default,
            help=f"sandbox {name} port (default {default}, env {env_name}; 0: any free port)",
        )
    parser.add_argument(
        "--config-seed",
        default=os.environ.get("VV_CONFIG_SEED") or DEFAULT_CONFIG_SEED,
        help="seed of the seeded config ids (same seed, same ids; env VV_CONFIG_SEED)",
    )
    parser.add_argument(
        "--seed-reports",
        action="store_true",
        default=os.environ.get("SEED_REPORTS", "") not in ("", "0"),
        help="write three weeks of synthetic visit summaries (departments SYNTHETIC-1..5) so "
        "the portal's reports page shows something (env SEED_REPORTS=1)",
    )
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
            ehr_port=choose_port(args.ehr_port, "sandbox EHR", "--ehr-port"),
            entra_port=choose_port(args.entra_port, "Entra stand-in", "--entra-port"),
            graph_port=choose_port(args.graph_port, "Graph stand-in", "--graph-port"),
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
                    profile.fhir_base,
                    tenant.tid,
                    approver,
                    profile.vendor,
                    seeded_config_id(args.config_seed, tenant.tid, profile.name),
                )
                profiles.append(
                    f"    {profile.name:<8} {profile.label}  (ehrVendor {profile.vendor})\n"
                    f"             config {profile.config_id}\n"
                    f"             FHIR base {profile.fhir_base}\n"
                    f"             issuer    {profile.issuer}\n"
                )
            reports_line = ""
            if args.seed_reports:
                reports_line = _seed_reports(
                    tenant.tid, sandbox.ehr.profiles[0].config_id or "", users
                )
            # The admin's portal token goes to a file (1,300+ characters would drown the banner).
            token_file = REPO_ROOT / ".run" / "portal-token"
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(sandbox.entra.mint_user_token(admin) + "\n")
            token_file.chmod(0o600)
            first_config = sandbox.ehr.profiles[0].config_id
            personas = persona_lines(sandbox, tenant.tid)
            print(
                "\n"
                "  EHR virtual-visit connector: local demo\n"
                f'  Open the sandbox EHR and click "Start virtual visit":  {sandbox.ehr_url}/\n'
                f"  Connector:      {public_url}/api/health\n"
                f"  Patient device check:  {public_url}/api/device-test/{first_config}\n"
                f"  Sandbox EHR profiles (approved configs, tenant {tenant.name}):\n"
                f"{''.join(profiles)}"
                f"  Configuration portal:  {portal_url(public_url)}\n"
                '  Click "Sign in with Microsoft", then pick the account of the persona:\n'
                f"{personas}"
                f"{reports_line}"
                f"  Entra (HTTPS):  {sandbox.entra_url}   Graph/Teams: {sandbox.graph_url}\n"
                '  Portal API:     curl -H "Authorization: Bearer $TOKEN" '
                f"{public_url}/api/configs\n"
                f"                  export TOKEN=$(cat {token_file})\n"
                "  Write-backs: each appointment on the EHR page lists the AuditEvents and Epic\n"
                "  status calls it received; the group visit is in the Epic and generic tables.\n"
                "  The log below names every request the connector serves: POST /api/presence\n"
                "  (and /api/presence/lifecycle) are the Graph stand-in's call events and its\n"
                "  subscription validation (a few per join or leave); the presence_renewal timer\n"
                "  runs every 5 minutes.\n"
                "  Ctrl-C stops everything.\n",
                flush=True,
            )
            stop.wait()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
