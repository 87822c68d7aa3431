"""Composition: the three servers, their settings for the connector, TLS trust, the CLI."""

from __future__ import annotations

import html
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import certifi
import httpx
import msal
import pytest
from cryptography import x509

from devtools.sandbox import Sandbox
from devtools.sandbox.tls import ensure_tls
from tests.integration.sandbox_entra_graph.conftest import account_links, ca_context

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_connector_settings_point_at_running_servers(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, contoso: str
) -> None:
    settings = sandbox.connector_settings()
    assert set(settings) == {
        "ENTRA_AUTHORITY_HOST",
        "ENTRA_CLIENT_ID",
        "ENTRA_CLIENT_SECRET",
        "GRAPH_BASE_URL",
        "SMART_CLIENT_ID",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
    }
    assert settings["ENTRA_AUTHORITY_HOST"].startswith("https://127.0.0.1:")
    assert settings["GRAPH_BASE_URL"] == sandbox.graph_url
    assert settings["SMART_CLIENT_ID"] == "vv-connector-local"
    assert f"{sandbox.connector_url}/api/launch/sso-callback" in sandbox.entra.redirect_uris
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    # httpx with trust_env (the default) reads SSL_CERT_FILE; public and sandbox CAs both work
    with httpx.Client() as client:
        doc = client.get(
            f"{settings['ENTRA_AUTHORITY_HOST']}/{contoso}/v2.0/.well-known/openid-configuration"
        ).json()
        assert doc["issuer"] == f"{sandbox.entra_url}/{contoso}/v2.0"
        smart = client.get(f"{sandbox.fhir_base}/.well-known/smart-configuration")
        assert smart.status_code == 200
        assert "S256" in smart.json()["code_challenge_methods_supported"]


def test_msal_form_post_response_mode(sandbox: Sandbox, msal_trust: None, fabrikam: str) -> None:
    app = msal.ConfidentialClientApplication(
        sandbox.entra.client_id,
        client_credential=sandbox.entra.client_secret,
        authority=f"{sandbox.entra_url}/organizations",
        instance_discovery=False,
    )
    flow = app.initiate_auth_code_flow(
        ["User.Read"],
        redirect_uri=f"{sandbox.connector_url}/api/launch/sso-callback",
        response_mode="form_post",
    )
    with httpx.Client(verify=ca_context(sandbox)) as browser:
        picker = browser.get(flow["auth_uri"])
        links = account_links(picker.text)
        clinician = next(u for u in sandbox.entra.users_in(fabrikam) if u.kind == "clinician")
        assert clinician.upn in links  # the multi-tenant picker lists every tenant
        page = browser.get(links[clinician.upn]).text
    assert f'action="{sandbox.connector_url}/api/launch/sso-callback"' in page
    fields = {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)
    }
    result = app.acquire_token_by_auth_code_flow(flow, fields)
    assert result["id_token_claims"]["tid"] == fabrikam
    assert result["id_token_claims"]["iss"] == sandbox.entra.issuer(fabrikam)


def test_tls_material(tmp_path: Path) -> None:
    tls = ensure_tls(tmp_path / "tls")
    bundle = tls.ca_bundle.read_bytes()
    assert Path(certifi.where()).read_bytes().strip() in bundle  # public CAs keep working
    assert tls.ca_cert.read_bytes() in bundle
    leaf = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert oct(tls.server_key.stat().st_mode & 0o777) == "0o600"
    again = ensure_tls(tmp_path / "tls")  # reused while valid
    assert again.ca_cert.read_bytes() == tls.ca_cert.read_bytes()


def test_cli_prints_urls_and_settings(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.sandbox",
            "--connector-url",
            "http://127.0.0.1:7071",
            "--state-dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        assert "Ctrl-C to stop." in text, text
        entra = re.search(r"Entra ID \(HTTPS\)\s+(\S+)", text)
        assert entra is not None
        assert "export ENTRA_AUTHORITY_HOST=" in text and "Contoso Health" in text
        ca = tmp_path / "sandbox-tls" / "ca-bundle.pem"
        response = httpx.get(
            f"{entra.group(1)}/organizations/v2.0/.well-known/openid-configuration",
            verify=ssl.create_default_context(cafile=str(ca)),
        )
        assert response.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


def test_seed_lookups(sandbox: Sandbox) -> None:
    user = sandbox.entra.user_by_upn("ADMIN@contosohealth.onmicrosoft.com")
    assert user.kind == "admin"
    assert sandbox.entra.tenant_by_name("Fabrikam Clinics").domain.startswith("fabrikam")
