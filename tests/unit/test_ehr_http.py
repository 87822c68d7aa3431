"""connector_core.adapters.ehr_http: private-target allowances, the address and endpoint policy,
and the guarded client against real local TCP servers on 127.0.0.1 (HTTPS with a CA made here,
plain HTTP for dev mode). "No connection" is checked on the server side: a probe connection is
made afterwards and must be the first one the server ever accepted."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connector_core.adapters.ehr_http import (
    EhrTargetPolicy,
    describe_hosts,
    guarded_client,
    is_target_refusal,
    parse_private_targets,
    registrable_domain,
)
from connector_core.errors import PermissionDeniedError, SettingsError

STRICT = EhrTargetPolicy(dev_mode=False)
DEV = EhrTargetPolicy(dev_mode=True)
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700:4700::1111"


# --- CONNECTOR_EHR_PRIVATE_TARGETS ----------------------------------------------------------


def test_parse_private_targets_reads_addresses_networks_and_ports() -> None:
    targets = parse_private_targets(" 127.0.0.1:8443, 10.0.0.0/8 ,[fd00::1]:443,fd12::/16,,")
    assert [(str(t.network), t.port) for t in targets] == [
        ("127.0.0.1/32", 8443),
        ("10.0.0.0/8", None),
        ("fd00::1/128", 443),
        ("fd12::/16", None),
    ]
    assert parse_private_targets("") == parse_private_targets(None) == ()


@pytest.mark.parametrize(
    "entry",
    [
        "ehr.internal",  # names are not allowed: DNS is what the guard does not trust
        "ehr.internal:443",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:https",
        "10.0.0.1:",
        "10.0.0.0/33",
        "[fd00::1]x",
        "[fd00::1:443",  # no closing bracket: not silently the address fd00::1:443, any port
        "[fd00::1]:99999",
    ],
)
def test_parse_private_targets_names_a_bad_entry(entry: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_private_targets(f"10.0.0.5:443,{entry}")
    assert caught.value.setting == "CONNECTOR_EHR_PRIVATE_TARGETS"
    assert entry in str(caught.value)


# --- address policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.10",
        "169.254.169.254",  # cloud metadata
        "fe80::1",
        "100.64.0.1",  # shared (CGNAT)
        "fd00::5",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
    ],
)
def test_non_public_addresses_are_refused_outside_dev_mode_only(address: str) -> None:
    assert STRICT.refusal(address, 443) is not None
    assert DEV.refusal(address, 443) is None


@pytest.mark.parametrize("address", [PUBLIC_V4, PUBLIC_V6])
def test_public_addresses_are_allowed(address: str) -> None:
    assert STRICT.refusal(address, 443) is None


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "224.0.0.1", "not-an-ip"])
def test_unspecified_multicast_and_names_are_refused_even_in_dev_mode(address: str) -> None:
    assert DEV.refusal(address, 443) is not None


def test_private_target_allowance_is_exact_by_address_and_port() -> None:
    policy = EhrTargetPolicy(
        dev_mode=False, private_targets=parse_private_targets("10.0.0.5:8443,[fd00::1]:443")
    )
    assert policy.refusal("10.0.0.5", 8443) is None
    assert policy.refusal("fd00::1", 443) is None
    assert policy.refusal("10.0.0.5", 443) is not None  # another port
    assert policy.refusal("10.0.0.6", 8443) is not None  # another address
    assert policy.refusal("fd00::1", 8443) is not None
    assert policy.refusal("127.0.0.1", 8443) is not None
    assert policy.refusal("169.254.169.254", 80) is not None


def test_private_network_allowance_covers_its_network_only() -> None:
    policy = EhrTargetPolicy(dev_mode=False, private_targets=parse_private_targets("10.0.0.0/8"))
    assert policy.refusal("10.200.1.1", 443) is None
    assert policy.refusal("10.200.1.1", 8443) is None  # no port: any port
    assert policy.refusal("192.168.0.1", 443) is not None
    assert policy.refusal("169.254.169.254", 80) is not None


# --- URLs and discovery endpoints ---------------------------------------------------------------


def test_check_url_needs_https_outside_dev_mode() -> None:
    STRICT.check_url("https://ehr.example.com/fhir", "FHIR endpoint")
    with pytest.raises(PermissionDeniedError) as caught:
        STRICT.check_url("http://ehr.example.com/fhir", "FHIR endpoint")
    assert caught.value.extra["reason"] == "ehr_target_refused"
    assert "FHIR endpoint" in caught.value.detail
    DEV.check_url("http://127.0.0.1:8080/fhir", "FHIR endpoint")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://ehr.example.com/x",
        "https:///no-host",
        "https://user:pw@ehr.example.com/token",
        "https://ehr.example.com/\r\nSet-Cookie: a",
        "https://ehr.example.com/a b",
        "javascript:alert(1)",
    ],
)
def test_check_url_refuses_unusable_urls_even_in_dev_mode(url: str) -> None:
    with pytest.raises(PermissionDeniedError):
        DEV.check_url(url, "token endpoint")


FHIR_BASE = "https://fhir.epic.example.com/api/FHIR/R4"


@pytest.mark.parametrize(
    "url",
    [
        "https://fhir.epic.example.com/oauth2/token",  # the same host
        "https://FHIR.epic.example.com:8443/oauth2/token",  # case and port do not matter
        "https://oauth.epic.example.com/oauth2/token",  # the same registrable domain
        "https://example.com/token",
        "https://a.b.login.example.com/token",
    ],
)
def test_check_endpoint_allows_the_fhir_base_host_and_its_registrable_domain(url: str) -> None:
    assert STRICT.check_endpoint(url, fhir_base_url=FHIR_BASE, allowed_hosts=(), what="x") == url


@pytest.mark.parametrize(
    ("base", "url"),
    [
        (FHIR_BASE, "https://evil.example.net/token"),
        (FHIR_BASE, "https://example.com.evil.example.net/token"),
        (FHIR_BASE, "https://epic.example.org/token"),
        # a multi-label public suffix is not a registrable domain: hospital.co.uk and
        # attacker.co.uk are different organizations (naively, both end in "co.uk")
        ("https://fhir.hospital.co.uk/r4", "https://auth.attacker.co.uk/token"),
        ("https://fhir.hospital.co.uk/r4", "https://co.uk/token"),
        # the private section of the list too: every github.io site is its own
        ("https://ehr-a.github.io/fhir", "https://ehr-b.github.io/token"),
        # addresses are compared whole
        ("https://10.0.0.5/fhir", "https://10.0.0.6/token"),
    ],
)
def test_check_endpoint_refuses_other_hosts(base: str, url: str) -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        STRICT.check_endpoint(url, fhir_base_url=base, allowed_hosts=(), what="token endpoint")
    assert caught.value.extra["reason"] == "ehr_host_not_approved"
    assert "token endpoint" in caught.value.detail


def test_check_endpoint_accepts_the_recorded_allowance_only() -> None:
    url = "https://auth.vendor-cloud.example.net/token"
    allowance = ("AUTH.vendor-cloud.example.net",)
    assert STRICT.check_endpoint(url, fhir_base_url=FHIR_BASE, allowed_hosts=allowance, what="x")
    with pytest.raises(PermissionDeniedError, match="not approved"):
        STRICT.check_endpoint(
            "https://keys.vendor-cloud.example.net/jwks",
            fhir_base_url=FHIR_BASE,
            allowed_hosts=allowance,
            what="JWKS URI",
        )


def test_check_endpoint_still_needs_https_for_an_approved_host() -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        STRICT.check_endpoint(
            "http://fhir.epic.example.com/oauth2/token",
            fhir_base_url=FHIR_BASE,
            allowed_hosts=("fhir.epic.example.com",),
            what="token endpoint",
        )
    assert caught.value.extra["reason"] == "ehr_target_refused"


def test_registrable_domain_and_describe_hosts() -> None:
    assert registrable_domain("fhir.epic.example.com") == "example.com"
    assert registrable_domain("FHIR.Example.co.uk.") == "example.co.uk"
    assert registrable_domain("10.0.0.5") == "10.0.0.5"
    assert describe_hosts(
        ["https://A.example.com/x", None, "https://a.example.com/y", "https://b.example.org"]
    ) == ("a.example.com", "b.example.org")


# --- the guarded client against a real local server -----------------------------------------


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def tls() -> Tls:
    """A CA and a certificate for ``ehr.test`` and 127.0.0.1 (EC keys: fast)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("ehr.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("ehr.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return Tls(server=server, client=client)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    """Records the client port of every connection it accepts, before any TLS handshake."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tls = tls
        self.peers: list[int] = []
        self.paths: list[str] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = self.socket.accept()
        self.peers.append(address[1])
        return conn, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request = self.tls.wrap_socket(request, server_side=True)
        try:
            super().finish_request(request, client_address)
        finally:
            request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the probe connection hangs up without a TLS handshake

    def assert_no_connection(self) -> None:
        """Connections are accepted in order: if the probe is the first the server saw, nothing
        reached it before."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
            mine = probe.getsockname()[1]
            deadline = time.monotonic() + 5
            while mine not in self.peers and time.monotonic() < deadline:
                time.sleep(0.002)
        assert self.peers == [mine], "the guarded client connected to the server"


def _serve(tls: ssl.SSLContext | None) -> Iterator[LocalServer]:
    server = LocalServer(tls)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def https_server(tls: Tls) -> Iterator[LocalServer]:
    yield from _serve(tls.server)


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    yield from _serve(None)


def _resolver(*answers: str) -> Any:
    """A DNS stand-in: every name resolves to ``answers``."""

    def resolve(host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        resolve.asked.append(host)  # type: ignore[attr-defined]
        out: list[tuple[Any, ...]] = []
        for address in answers:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr: tuple[Any, ...] = (
                (address, port)
                if ":" not in address
                else (
                    address,
                    port,
                    0,
                    0,
                )
            )
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    resolve.asked = []  # type: ignore[attr-defined]
    return resolve


def _allow(port: int) -> EhrTargetPolicy:
    return EhrTargetPolicy(
        dev_mode=False, private_targets=parse_private_targets(f"127.0.0.1:{port}")
    )


def test_guard_refuses_loopback_outside_dev_mode_without_connecting(
    https_server: LocalServer, tls: Tls
) -> None:
    with (
        guarded_client(STRICT, ssl_context=tls.client) as client,
        pytest.raises(httpx.ConnectError) as caught,
    ):
        client.get(f"https://127.0.0.1:{https_server.port}/")
    assert is_target_refusal(caught.value)
    https_server.assert_no_connection()


def test_guard_connects_to_an_allowed_private_target(https_server: LocalServer, tls: Tls) -> None:
    resolver = _resolver("127.0.0.1")
    with guarded_client(_allow(https_server.port), resolver=resolver, ssl_context=tls.client) as c:
        response = c.get(f"https://ehr.test:{https_server.port}/metadata")  # TLS checks the name
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert https_server.paths == ["/metadata"]
    assert resolver.asked == ["ehr.test"]


def test_guard_allowance_for_another_port_is_refused(https_server: LocalServer, tls: Tls) -> None:
    with (
        guarded_client(_allow(https_server.port + 1), ssl_context=tls.client) as client,
        pytest.raises(httpx.ConnectError) as caught,
    ):
        client.get(f"https://127.0.0.1:{https_server.port}/")
    assert is_target_refusal(caught.value)
    https_server.assert_no_connection()


@pytest.mark.parametrize(
    "answers",
    [("127.0.0.1",), (PUBLIC_V4, "127.0.0.1"), ("::ffff:127.0.0.1",)],
    ids=["private", "one-private-among-public", "v4-mapped"],
)
def test_guard_refuses_a_public_looking_name_that_resolves_privately(
    https_server: LocalServer, tls: Tls, answers: tuple[str, ...]
) -> None:
    # DNS is the tenant's: a public name answering a private address must not reach it, and
    # one bad answer taints the name (nothing is dialled, not even the public address).
    with (
        guarded_client(STRICT, resolver=_resolver(*answers), ssl_context=tls.client) as client,
        pytest.raises(httpx.ConnectError) as caught,
    ):
        client.get(f"https://fhir.epic.example.com:{https_server.port}/")
    assert is_target_refusal(caught.value)
    https_server.assert_no_connection()


def test_guard_checks_the_address_again_on_every_new_connection(
    https_server: LocalServer, tls: Tls
) -> None:
    answers = ["127.0.0.1"]

    def rebinding(host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[0], port))]

    policy = _allow(https_server.port)
    with guarded_client(policy, resolver=rebinding, ssl_context=tls.client) as client:
        url = f"https://ehr.test:{https_server.port}"
        assert client.get(f"{url}/close").status_code == 200  # the server hangs up after this
        answers[0] = "169.254.169.254"  # DNS now points at the metadata service
        with pytest.raises(httpx.ConnectError) as caught:
            client.get(f"{url}/again")
    assert is_target_refusal(caught.value)
    assert https_server.paths == ["/close"]


def test_guard_does_not_follow_redirects(https_server: LocalServer, tls: Tls) -> None:
    with guarded_client(_allow(https_server.port), ssl_context=tls.client) as client:
        response = client.get(f"https://127.0.0.1:{https_server.port}/redirect")
    assert response.status_code == 302
    assert https_server.paths == ["/redirect"]


def test_guard_ignores_proxy_settings(
    https_server: LocalServer, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing listens
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with guarded_client(_allow(https_server.port), ssl_context=tls.client) as client:
        assert client.trust_env is False and client.follow_redirects is False
        assert client.get(f"https://127.0.0.1:{https_server.port}/").status_code == 200
    assert https_server.paths == ["/"]


def test_guard_refuses_http_outside_dev_mode(http_server: LocalServer) -> None:
    with (
        guarded_client(_allow(http_server.port)) as client,
        pytest.raises(httpx.UnsupportedProtocol) as caught,
    ):
        client.get(f"http://127.0.0.1:{http_server.port}/")
    assert is_target_refusal(caught.value)
    http_server.assert_no_connection()


def test_guard_allows_http_and_loopback_in_dev_mode(http_server: LocalServer) -> None:
    with guarded_client(DEV) as client:
        response = client.get(f"http://127.0.0.1:{http_server.port}/metadata")
    assert response.status_code == 200
    assert http_server.paths == ["/metadata"]


def test_guard_refuses_the_unspecified_address_even_in_dev_mode(http_server: LocalServer) -> None:
    with (
        guarded_client(DEV, resolver=_resolver("0.0.0.0")) as client,
        pytest.raises(httpx.ConnectError) as caught,
    ):
        client.get(f"http://ehr.test:{http_server.port}/")
    assert is_target_refusal(caught.value)
    http_server.assert_no_connection()


def test_plain_connection_failures_are_not_refusals() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connection refused
        with guarded_client(DEV) as client, pytest.raises(httpx.ConnectError) as caught:
            client.get(f"http://127.0.0.1:{port}/")
    assert not is_target_refusal(caught.value)
