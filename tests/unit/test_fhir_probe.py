"""FhirProbe: URL syntax, target address checks (loopback variants), pinned connections,
SMART discovery, PKCE S256, FHIR version, redirects and time limits against a tiny local server.

Only loopback targets are ever connected to; other ranges are checked as pure classifications.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from connector_core.adapters.fhir_probe import FhirProbe, canonical_fhir_base_url, check_address
from connector_core.errors import InvalidInputError
from devtools._serve import ServerThread


class FakeEhr:
    """Serves /{flavor}/.well-known/smart-configuration and /{flavor}/metadata."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.paths: list[str] = []
        self.delay = 0.0
        self.app = Starlette(
            routes=[
                Route("/big/.well-known/smart-configuration", self.big),
                Route("/{flavor}/.well-known/smart-configuration", self.smart),
                Route("/{flavor}/metadata", self.metadata),
                Route("/hop/{n:int}/{flavor}/.well-known/smart-configuration", self.hop),
            ]
        )
        self.url = ""

    def _seen(self, request: Request) -> None:
        self.hosts.append(request.headers.get("host", ""))
        self.paths.append(request.url.path)

    async def smart(self, request: Request) -> Response:
        self._seen(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        flavor = request.path_params["flavor"]
        if flavor == "missing":
            return JSONResponse({"error": "not found"}, status_code=404)
        if flavor == "html":
            return Response("<html>login</html>", media_type="text/html")
        if flavor == "offsite":
            return RedirectResponse("http://localhost:1/r4/.well-known/smart-configuration")
        methods = {"nopkce": ["plain"], "nomethods": None}.get(flavor, ["S256"])
        doc: dict[str, Any] = {
            "authorization_endpoint": f"{self.url}/oauth2/authorize",
            "token_endpoint": f"{self.url}/oauth2/token",
            "capabilities": ["launch-standalone"],
        }
        if methods is not None:
            doc["code_challenge_methods_supported"] = methods
        return JSONResponse(doc)

    async def hop(self, request: Request) -> Response:
        self._seen(request)
        n = request.path_params["n"]
        flavor = request.path_params["flavor"]
        if n == 0:
            return RedirectResponse(f"/{flavor}/.well-known/smart-configuration")
        return RedirectResponse(f"/hop/{n - 1}/{flavor}/.well-known/smart-configuration")

    async def big(self, request: Request) -> Response:
        return Response(b"{" + b" " * 2_000_000 + b"}", media_type="application/json")

    async def metadata(self, request: Request) -> Response:
        self._seen(request)
        flavor = request.path_params["flavor"]
        if flavor == "dstu2":
            doc = {"resourceType": "Conformance", "fhirVersion": "1.0.2"}
        elif flavor == "stu3":
            doc = {"resourceType": "CapabilityStatement", "fhirVersion": "3.0.2"}
        elif flavor == "nometa":
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=404)
        else:
            doc = {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}
        return Response(json.dumps(doc), media_type="application/fhir+json")


@pytest.fixture(scope="module")
def ehr() -> Iterator[FakeEhr]:
    fake = FakeEhr()
    with ServerThread(fake.app, name="fake-ehr") as server:
        fake.url = server.url
        yield fake


@pytest.fixture(autouse=True)
def _reset(ehr: FakeEhr) -> None:
    ehr.delay = 0.0
    ehr.hosts.clear()
    ehr.paths.clear()


def code_of(exc: pytest.ExceptionInfo[InvalidInputError]) -> str:
    assert exc.value.extra["field"] == "fhirBaseUrl"
    assert exc.value.extra["errors"][0]["field"] == "fhirBaseUrl"
    return str(exc.value.extra["code"])


# --- 1. syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("", "url-syntax"),
        ("   ", "url-syntax"),
        ("ehr.example.org/fhir", "url-scheme"),
        ("ftp://ehr.example.org/fhir", "url-scheme"),
        ("javascript:alert(1)", "url-scheme"),
        ("http://ehr.example.org/fhir", "url-scheme"),
        ("https://user:pw@ehr.example.org/fhir", "url-syntax"),
        ("https://ehr.example.org/fhir?x=1", "url-syntax"),
        ("https://ehr.example.org/fhir#frag", "url-syntax"),
        ("https://ehr.example.org/fhir/../admin", "url-syntax"),
        ("https://ehr.example.org:99999/fhir", "url-syntax"),
        ("https://ehr.example.org/fh ir", "url-syntax"),
        ("https:///fhir", "url-scheme"),
        ("https://" + "a" * 2100 + ".org/", "url-syntax"),
    ],
)
def test_syntax_and_scheme_failures(url: str, code: str) -> None:
    probe = FhirProbe(dev_mode=False)
    with pytest.raises(InvalidInputError) as exc:
        probe.probe(url)
    assert code_of(exc) == code
    assert exc.value.http_status == 400


def test_canonical_form() -> None:
    assert canonical_fhir_base_url("HTTPS://EHR.Example.ORG:443/api/FHIR/R4/") == (
        "https://ehr.example.org/api/FHIR/R4"
    )
    assert (
        canonical_fhir_base_url("http://127.0.0.1:8080/fhir/r4") == "http://127.0.0.1:8080/fhir/r4"
    )
    assert canonical_fhir_base_url("https://[::1]:8443/r4") == "https://[::1]:8443/r4"


# --- 2. target address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/fhir/r4",
        "https://127.1.2.3/fhir/r4",
        "https://[::1]/fhir/r4",
        "https://localhost/fhir/r4",
        "https://LOCALHOST:8443/fhir/r4",
        "https://2130706433/fhir/r4",
        "https://0x7f.1/fhir/r4",
        "https://127.1/fhir/r4",
        "https://017700000001/fhir/r4",
        "https://[::ffff:127.0.0.1]/fhir/r4",
    ],
)
def test_loopback_variants_are_refused_outside_dev_mode(url: str) -> None:
    calls: list[str] = []

    def resolver(host: str, *args: Any) -> Any:
        calls.append(host)
        return socket.getaddrinfo(host, *args)

    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=False, resolver=resolver).probe(url)
    assert code_of(exc) == "url-target"
    assert "loopback" in exc.value.detail
    assert calls, "the host must be resolved, not guessed from its spelling"


def test_unresolvable_host() -> None:
    def resolver(*_: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=False, resolver=resolver).probe("https://ehr.invalid/fhir/r4")
    assert code_of(exc) == "url-unresolvable"
    assert "ehr.invalid" in exc.value.detail


def test_every_resolved_address_is_checked() -> None:
    """A name with one public and one loopback address is refused (no "first one wins")."""

    def resolver(host: str, port: int, *_: Any) -> Any:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=False, resolver=resolver).probe("https://ehr.example.test/fhir/r4")
    assert code_of(exc) == "url-target"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "shared"),
        ("240.0.0.1", "reserved"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 wrapping 169.254.169.254
        ("192.0.2.10", "private"),  # documentation range (Python counts it as private)
    ],
)
def test_address_classification(address: str, reason: str) -> None:
    why = check_address(address, dev_mode=False)
    assert why is not None and reason in why


def test_public_addresses_pass_and_dev_mode_allows_loopback_only_ranges() -> None:
    assert check_address("93.184.216.34", dev_mode=False) is None
    assert check_address("2606:2800:220:1::1", dev_mode=False) is None
    assert check_address("127.0.0.1", dev_mode=True) is None
    assert check_address("::1", dev_mode=True) is None
    assert check_address("0.0.0.0", dev_mode=True) is not None
    assert check_address("224.0.0.1", dev_mode=True) is not None


# --- pinned connection -------------------------------------------------------------------------


def test_connects_only_to_the_checked_address_with_the_original_host(ehr: FakeEhr) -> None:
    """DNS rebinding: the name is resolved once; later answers are never used."""
    port = int(ehr.url.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1"])
    calls: list[str] = []

    def rebinding_resolver(host: str, port_: int, *_: Any) -> Any:
        calls.append(host)
        address = next(answers, "198.51.100.7")  # a second lookup would get another address
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]

    probe = FhirProbe(dev_mode=True, resolver=rebinding_resolver)
    report = probe.probe(f"http://fhir.example.test:{port}/r4")
    assert report.fhir_version == "4.0.1"
    assert report.address == "127.0.0.1"
    assert calls.count("fhir.example.test") == 1
    assert set(ehr.hosts) == {f"fhir.example.test:{port}"}
    assert ehr.paths == ["/r4/.well-known/smart-configuration", "/r4/metadata"]


# --- 3-5. discovery, PKCE, version -------------------------------------------------------------


def test_happy_path_in_dev_mode(ehr: FakeEhr) -> None:
    report = FhirProbe(dev_mode=True).probe(f"{ehr.url}/r4/")
    assert report.fhir_base_url == f"{ehr.url}/r4"
    assert report.token_endpoint == f"{ehr.url}/oauth2/token"
    assert report.authorization_endpoint == f"{ehr.url}/oauth2/authorize"


@pytest.mark.parametrize(
    ("flavor", "code", "words"),
    [
        ("missing", "smart-discovery-unreachable", "404"),
        ("html", "smart-discovery-invalid", "JSON"),
        ("offsite", "smart-discovery-unreachable", "another host"),
        ("nopkce", "pkce-s256-unsupported", "S256"),
        ("nomethods", "pkce-s256-unsupported", "S256"),
        ("dstu2", "fhir-version-dstu2", "R4"),
        ("stu3", "fhir-version-not-r4", "STU3"),
        ("nometa", "fhir-metadata-unreachable", "404"),
    ],
)
def test_each_failure_has_its_own_message(ehr: FakeEhr, flavor: str, code: str, words: str) -> None:
    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=True).probe(f"{ehr.url}/{flavor}")
    assert code_of(exc) == code
    assert words in exc.value.detail


def test_dstu2_message_suggests_the_r4_url(ehr: FakeEhr) -> None:
    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=True).probe(f"{ehr.url}/dstu2")
    assert exc.value.extra["suggestedUrl"] == f"{ehr.url}/r4"
    assert f"{ehr.url}/r4" in exc.value.detail


def test_same_host_redirects_are_followed_at_most_twice(ehr: FakeEhr) -> None:
    # /hop/1/r4 -> /hop/0/r4 -> /r4 : two redirects, fine (the base is /hop/1/r4... so build the
    # probe's discovery URL path via the hop route)
    probe = FhirProbe(dev_mode=True)
    status, doc = probe._get_json(  # the redirect loop itself
        probe._client({"127.0.0.1": "127.0.0.1"}),
        _parsed(ehr.url),
        f"{ehr.url}/hop/1/r4/.well-known/smart-configuration",
        accept="application/json",
        deadline=_deadline(),
        code="smart-discovery-unreachable",
        what="discovery",
    )
    assert status == 200 and "S256" in doc["code_challenge_methods_supported"]
    with pytest.raises(InvalidInputError) as exc:
        probe._get_json(
            probe._client({"127.0.0.1": "127.0.0.1"}),
            _parsed(ehr.url),
            f"{ehr.url}/hop/2/r4/.well-known/smart-configuration",
            accept="application/json",
            deadline=_deadline(),
            code="smart-discovery-unreachable",
            what="discovery",
        )
    assert "more than 2" in exc.value.detail


def test_slow_server_times_out(ehr: FakeEhr) -> None:
    ehr.delay = 2.0
    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=True, read_timeout=0.3).probe(f"{ehr.url}/r4")
    assert code_of(exc) == "smart-discovery-unreachable"
    assert "within" in exc.value.detail


def test_oversized_answer_is_refused(ehr: FakeEhr) -> None:
    with pytest.raises(InvalidInputError) as exc:
        FhirProbe(dev_mode=True).probe(f"{ehr.url}/big")
    assert "too large" in exc.value.detail


def test_connection_refused_is_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        with pytest.raises(InvalidInputError) as exc:
            FhirProbe(dev_mode=True).probe(f"http://127.0.0.1:{port}/r4")
    assert code_of(exc) == "smart-discovery-unreachable"
    assert "Could not connect" in exc.value.detail


def test_server_side_endpoints_from_discovery_are_checked() -> None:
    def resolver(host: str, port: int, *_: Any) -> Any:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    probe = FhirProbe(dev_mode=False, resolver=resolver)
    with pytest.raises(InvalidInputError) as exc:
        probe._check_server_side_target("https://token.example.test/oauth2/token", "token_endpoint")
    assert code_of(exc) == "url-target" and "token_endpoint" in exc.value.detail


def _parsed(url: str) -> Any:
    from connector_core.adapters.fhir_probe import _parse

    return _parse(url, allow_http=True)


def _deadline() -> Any:
    from connector_core.adapters.fhir_probe import _Deadline

    return _Deadline(5.0)
