"""Run the sandbox on its own: ``python -m devtools.sandbox --connector-url http://127.0.0.1:7071``.

Prints the URLs and the connector settings (as ``export`` lines), then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from pathlib import Path

from devtools.sandbox import Sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.sandbox", description=__doc__)
    parser.add_argument("--connector-url", default="http://127.0.0.1:7071")
    parser.add_argument("--smart-client-id", default="vv-connector-local")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=REPO_ROOT / ".run",
        help="where the local CA and server certificate are kept (default: .run/)",
    )
    for name in ("ehr", "entra", "graph"):
        parser.add_argument(f"--{name}-port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Sandbox(
        connector_url=args.connector_url,
        smart_client_id=args.smart_client_id,
        state_dir=args.state_dir,
        ehr_port=args.ehr_port,
        entra_port=args.entra_port,
        graph_port=args.graph_port,
    ) as sandbox:
        print(f"EHR (SMART on FHIR)  {sandbox.ehr_url}   (appointments page: {sandbox.ehr_url}/)")
        for profile in sandbox.ehr.profiles:
            print(f"  {profile.name:<8} FHIR base {profile.fhir_base}")
            print(f"           issuer    {profile.issuer}")
        print(f"Entra ID (HTTPS)     {sandbox.entra_url}")
        print(f"Graph / Teams        {sandbox.graph_url}")
        print(f"CA certificate       {sandbox.tls.ca_cert}")
        print("Tenants and users:")
        for tenant in sandbox.entra.tenants.values():
            print(f"  {tenant.name}  tid {tenant.tid}")
            for user in sandbox.entra.users_in(tenant.tid):
                print(f"    {user.kind:<9} {user.upn:<48} oid {user.oid}")
        print("Connector settings:")
        for key, value in sandbox.connector_settings().items():
            print(f"  export {key}={shlex.quote(value)}")
        print("Ctrl-C to stop.", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
