"""The portal's pure parts: language negotiation, integration records per EHR, sealed session
cookies and their timeouts, same-site checks, the Graph search expression, the sandbox's portal
personas, and that ``import function_app`` does not load the portal's libraries."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from connector_core.adapters.graph_directory import search_expression
from connector_core.adapters.memory import InMemoryEntityStore
from connector_core.crypto import Keyring
from connector_core.domain.models import (
    ConfigStatus,
    EhrVendor,
    Environment,
    Region,
    utcnow,
)
from connector_core.service.portal_models import (
    BackendServices,
    Caller,
    ConfigOut,
    IntegrationRecord,
)
from connector_core.service.portal_web import i18n
from connector_core.service.portal_web.records import records_for
from connector_core.service.portal_web.sessions import (
    ABSOLUTE_TIMEOUT,
    SESSION_COOKIE,
    SessionStore,
    is_same_site,
    valid_csrf,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
API = "https://vv.example/api"
CALLER = Caller(
    tenant_id="t1", object_id="oid-1", upn="admin@contoso.example", roles=frozenset({"x"})
)


@pytest.mark.parametrize(
    ("header", "cookie", "requested", "expected"),
    [
        ("pt-BR,pt;q=0.9,en;q=0.8", None, None, "pt-BR"),
        ("pt-PT", None, None, "pt-BR"),  # the Portuguese we have
        ("es-419,es;q=0.9", None, None, "es"),
        ("de-DE,fr;q=0.9", None, None, "en"),
        ("de;q=1, es;q=0.4, pt;q=0.5", None, None, "pt-BR"),  # by quality, not order
        ("es;q=0, en", None, None, "en"),  # q=0 means "not this"
        ("", None, None, "en"),
        ("en", "es", None, "es"),  # the switch, remembered in the cookie
        ("en", "es", "pt-br", "pt-BR"),  # ?lang= wins
        ("es", "xx", "zz", "es"),  # unknown choices are ignored
        ("*", None, None, "en"),
    ],
)
def test_language_negotiation(
    header: str, cookie: str | None, requested: str | None, expected: str
) -> None:
    assert i18n.negotiate(accept_language=header, cookie=cookie, requested=requested) == expected


def test_language_cookie_is_host_only_and_secure() -> None:
    cookie = i18n.language_cookie("pt-BR")
    assert cookie.startswith("__Host-vv-lang=pt-BR;")
    assert "Path=/" in cookie and "Secure" in cookie and "Domain" not in cookie


def _config(vendor: EhrVendor) -> ConfigOut:
    now = utcnow()
    records = [
        IntegrationRecord(
            type=kind,
            launch_url=f"{API}/launch/{kind}/cfg1",
            redirect_uri=f"{API}/launch/callback",
            client_id="client-1",
            scopes=["launch", "openid", "fhirUser"],
            jwks_url=f"{API}/.well-known/jwks.json",
        )
        for kind in ("provider", "patient")
    ]
    return ConfigOut(
        id="cfg1",
        tenant_id="t1",
        region=Region.AMERICAS,
        fhir_base_url="https://fhir.example/api/FHIR/R4",
        approver_upn="a@contoso.example",
        environment=Environment.TEST,
        ehr_vendor=vendor,
        smart_client_id=None,
        status=ConfigStatus.APPROVED,
        created_at=now,
        created_by="x",
        updated_at=now,
        ehr_validated_at=now,
        ehr_validated_by="a@contoso.example",
        approved_at=now,
        approved_by="a@contoso.example",
        history=[],
        integration_records=records,
        backend_services=BackendServices(
            client_id="client-1", jwks_url=f"{API}/.well-known/jwks.json", scopes=["s"]
        ),
    )


def _values(vendor: EhrVendor) -> dict[tuple[str, str], str]:
    return {
        (group.key, field.key): field.value
        for group in records_for(_config(vendor), api_base_url=API)
        for field in group.fields
    }


def test_epic_records_carry_epics_context_tokens_and_a_group_visit_record() -> None:
    values = _values(EhrVendor.EPIC)
    provider, patient = f"{API}/launch/provider/cfg1", f"{API}/launch/patient/cfg1"
    assert values[("epic-provider", "launch-url")] == (
        f"{provider}?departmentId=%PERFDEPID%&sessionId=%CSN%"
    )
    assert values[("epic-patient", "launch-url")] == (
        f"{patient}?departmentId=%PERFDEPID%&sessionId=%CSN%"
    )
    assert values[("epic-group", "provider-launch-url")] == (
        f"{provider}?departmentId=%PERFDEPID%&sessionId=%CONFERENCEID%"
    )
    assert values[("epic-group", "patient-launch-url")].endswith("sessionId=%CONFERENCEID%")
    assert values[("epic-client", "signin-uri")] == f"{API}/ehr-signin/callback"
    assert values[("epic-client", "client-auth")] == "private_key_jwt (RS384)"


def test_oracle_and_smart_records_take_the_launch_urls_as_they_are() -> None:
    oracle = _values(EhrVendor.ORACLE)
    assert oracle[("oracle-provider", "launch-url")] == f"{API}/launch/provider/cfg1"
    assert oracle[("oracle-patient", "launch-url")] == f"{API}/launch/patient/cfg1"
    smart = _values(EhrVendor.SMART)
    assert smart[("smart-provider", "launch-url")] == f"{API}/launch/provider/cfg1"
    assert not any("%" in v for v in [*oracle.values(), *smart.values()])


def test_no_records_before_approval() -> None:
    pending = _config(EhrVendor.EPIC).model_copy(update={"integration_records": None})
    assert records_for(pending, api_base_url=API) == ()


@pytest.fixture
def sessions() -> SessionStore:
    return SessionStore(InMemoryEntityStore(), Keyring(b"k" * 32), region=Region.AMERICAS)


def _cookie_value(set_cookie: str) -> str:
    name, _, rest = set_cookie.partition("=")
    assert name == SESSION_COOKIE
    return rest.split(";", 1)[0]


def test_a_session_cookie_is_sealed_renewed_and_times_out(sessions: SessionStore) -> None:
    start = utcnow()
    session = sessions.create(caller=CALLER, now=start, home_account_id="h", token_cache="{}")
    set_cookie = sessions.cookie(session, now=start)
    for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
        assert attribute in set_cookie
    assert "Domain" not in set_cookie
    value = _cookie_value(set_cookie)
    assert "oid-1" not in value and session.sid not in value
    found = sessions.lookup(value, now=start + timedelta(seconds=10))
    assert found.session is not None and found.session.caller == CALLER
    assert found.set_cookie is None  # not renewed within the first minute
    renewed = sessions.lookup(value, now=start + timedelta(minutes=29))
    assert renewed.session is not None and renewed.set_cookie is not None
    newer = _cookie_value(renewed.set_cookie)
    # idle: a copy of the cookie not seen for 30 minutes is dead; the renewed one lives on
    assert sessions.lookup(value, now=start + timedelta(minutes=31)).expired
    assert sessions.lookup(newer, now=start + timedelta(minutes=50)).session is not None
    assert sessions.lookup(newer, now=start + timedelta(minutes=29 + 31)).expired


def test_absolute_timeout_tampering_and_sign_out(sessions: SessionStore) -> None:
    start = utcnow()
    session = sessions.create(caller=CALLER, now=start, home_account_id=None, token_cache=None)
    late = start + ABSOLUTE_TIMEOUT + timedelta(seconds=1)
    fresh = _cookie_value(sessions.cookie(session, now=late - timedelta(minutes=1)))
    assert sessions.lookup(fresh, now=late).expired
    other = sessions.create(caller=CALLER, now=start, home_account_id=None, token_cache=None)
    value = _cookie_value(sessions.cookie(other, now=start))
    tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    assert sessions.lookup(tampered, now=start).expired
    assert sessions.lookup("", now=start).session is None
    assert not sessions.lookup("", now=start).expired
    sessions.delete(other.sid)
    assert sessions.lookup(value, now=start).expired


def test_csrf_token_belongs_to_its_session(sessions: SessionStore) -> None:
    keyring = Keyring(b"k" * 32)
    store = SessionStore(InMemoryEntityStore(), keyring, region=Region.AMERICAS)
    now = utcnow()
    one = store.create(caller=CALLER, now=now, home_account_id=None, token_cache=None)
    two = store.create(caller=CALLER, now=now, home_account_id=None, token_cache=None)
    token = keyring.keyed_hash("portal-csrf", one.sid, length=64)
    assert valid_csrf(keyring, one, token)
    assert not valid_csrf(keyring, two, token)
    assert not valid_csrf(keyring, one, None) and not valid_csrf(keyring, one, "")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"sec-fetch-site": "same-origin"}, True),
        ({"sec-fetch-site": "same-site"}, False),
        ({"sec-fetch-site": "cross-site", "origin": "https://vv.example"}, False),
        ({"sec-fetch-site": "none"}, False),
        ({"origin": "https://vv.example"}, True),
        ({"origin": "https://VV.example/"}, True),
        ({"origin": "https://evil.example"}, False),
        ({"origin": "null"}, False),
        ({}, True),  # no browser metadata at all: the CSRF token alone decides
    ],
)
def test_same_site(headers: dict[str, str], expected: bool) -> None:
    assert is_same_site(headers, "https://vv.example") is expected


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("thorn", '"displayName:thorn" OR "mail:thorn"'),
        ('a"b\\c', '"displayName:a b c" OR "mail:a b c"'),
        ("  Perpetua   T  ", '"displayName:Perpetua T" OR "mail:Perpetua T"'),
        ("x", None),
        ("\x00\x01", None),
    ],
)
def test_search_expression_never_breaks_out_of_the_clause(typed: str, expected: str | None) -> None:
    assert search_expression(typed) == expected


def test_the_sandbox_has_the_portal_personas() -> None:
    from devtools.run import persona_lines
    from devtools.sandbox.entra import (
        ADMIN_ROLE,
        AUDITOR_ROLE,
        CONTOSO_TID,
        PORTAL_PERSONAS,
        SandboxEntra,
    )

    entra = SandboxEntra()
    roles = {name: entra.persona(name).roles for name in PORTAL_PERSONAS}
    assert roles == {
        "admin": (ADMIN_ROLE,),
        "approver": (),
        "admin-approver": (ADMIN_ROLE,),
        "auditor": (AUDITOR_ROLE,),
        "no-role": (),
    }
    assert entra.persona("approver").ehr_practitioner_id  # an EHR analyst in the EHR seed
    lines = persona_lines(SimpleNamespace(entra=entra), CONTOSO_TID)  # type: ignore[arg-type]
    for name in PORTAL_PERSONAS:
        assert f" {name} " in lines and entra.persona(name).upn in lines


def test_import_function_app_loads_no_template_or_catalog_library() -> None:
    code = (
        "import sys, function_app; "
        "print(','.join(m for m in ('jinja2', 'babel', 'connector_core.service.portal_web.pages',"
        " 'msal') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == ""
