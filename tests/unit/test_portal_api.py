"""Portal API functions called as the worker calls them (real func.HttpRequest), over the
in-memory container, a test Entra issuer (own key, JWKS over MockTransport), a fake probe and
a fake SMART client. The same flows run over real HTTP against the sandbox in
tests/integration/portal/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
import pytest

from connector_core.bootstrap import Container, reset_container, set_container
from connector_core.domain.models import utcnow
from connector_core.errors import InvalidInputError
from functions import portal
from tests.helpers import in_memory_container
from tests.unit.portal_fakes import (
    AUTHORITY,
    TENANT_B,
    FakeEntra,
    FakeProbe,
    FakeSmart,
)

FHIR = "https://fhir.example-health.test/api/FHIR/R4"
ADMIN = "admin@contoso.example"
APPROVER = "ehr.analyst@contoso.example"


class Portal:
    def __init__(self, container: Container, entra: FakeEntra) -> None:
        self.container = container
        self.entra = entra
        self.probe: FakeProbe = container.fhir_probe  # type: ignore[assignment]
        self.smart: FakeSmart = container.smart  # type: ignore[assignment]

    def token(
        self, upn: str | None = ADMIN, roles: tuple[str, ...] | None = None, **kw: Any
    ) -> str:
        if roles is None:
            roles = ("Connector.Admin",) if upn == ADMIN else ()
        return self.entra.token(upn=upn, roles=roles, **kw)

    def call(
        self,
        fn: Any,
        method: str,
        path: str,
        *,
        token: str | None = None,
        as_user: str | None = ADMIN,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        route: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> func.HttpResponse:
        hdrs = dict(headers or {})
        if token is None and as_user is not None:
            token = self.token(as_user)
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        return fn(  # type: ignore[no-any-return]
            func.HttpRequest(
                method=method,
                url=f"http://127.0.0.1:7071/api/{path}",
                headers=hdrs,
                params=params or {},
                route_params=route or {},
                body=data,
            )
        )

    # shortcuts -----------------------------------------------------------------------------
    def create(self, url: str = FHIR, env: str = "test", **kw: Any) -> func.HttpResponse:
        body = {"fhirBaseUrl": url, "approverUpn": APPROVER, "environment": env}
        return self.call(portal.portal_configs, "POST", "configs", body=body, **kw)

    def get(self, config_id: str, **kw: Any) -> func.HttpResponse:
        return self.call(
            portal.portal_config, "GET", f"configs/{config_id}", route={"id": config_id}, **kw
        )

    def put(self, config_id: str, body: Any, **kw: Any) -> func.HttpResponse:
        return self.call(
            portal.portal_config,
            "PUT",
            f"configs/{config_id}",
            route={"id": config_id},
            body=body,
            **kw,
        )

    def delete(self, config_id: str, **kw: Any) -> func.HttpResponse:
        return self.call(
            portal.portal_config, "DELETE", f"configs/{config_id}", route={"id": config_id}, **kw
        )

    def start_signin(self, config_id: str, **kw: Any) -> func.HttpResponse:
        kw.setdefault("as_user", APPROVER)
        return self.call(
            portal.portal_ehr_signin,
            "POST",
            f"configs/{config_id}/ehr-signin",
            route={"id": config_id},
            **kw,
        )

    def callback(self, params: dict[str, str]) -> func.HttpResponse:
        return self.call(
            portal.portal_ehr_signin_callback,
            "GET",
            "ehr-signin/callback",
            as_user=None,
            params=params,
        )

    def approve(self, config_id: str, **kw: Any) -> func.HttpResponse:
        kw.setdefault("as_user", APPROVER)
        return self.call(
            portal.portal_approve,
            "POST",
            f"configs/{config_id}/approve",
            route={"id": config_id},
            **kw,
        )

    def sign_in(self, config_id: str) -> func.HttpResponse:
        started = self.start_signin(config_id)
        assert started.status_code == 200, started.get_body()
        state = parse_qs(urlsplit(json_of(started)["authorizeUrl"]).query)["state"][0]
        return self.callback({"code": self.smart.issue_code(), "state": state})


def json_of(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body())


@pytest.fixture
def api() -> Iterator[Portal]:
    entra = FakeEntra()
    container = in_memory_container(ENTRA_AUTHORITY_HOST=AUTHORITY)
    container.portal_tokens = entra.validator()
    container.fhir_probe = FakeProbe()  # type: ignore[assignment]
    container.smart = FakeSmart()  # type: ignore[assignment]
    set_container(container)
    yield Portal(container, entra)
    reset_container()


def created_id(api: Portal, **kw: Any) -> str:
    response = api.create(**kw)
    assert response.status_code == 201, response.get_body()
    return str(json_of(response)["id"])


# --- create / read ----------------------------------------------------------------------------


def test_create_returns_the_config_with_etag_and_location(api: Portal) -> None:
    response = api.create(url=FHIR + "/")
    assert response.status_code == 201
    body = json_of(response)
    assert body["fhirBaseUrl"] == FHIR
    assert body["status"] == "pending_approval"
    assert body["tenantId"] == "11111111-1111-4111-8111-111111111111"
    assert body["region"] == "americas"
    assert body["approverUpn"] == APPROVER
    assert body["ehrVendor"] == "smart" and body["smartClientId"] is None
    assert body["ehrValidatedAt"] is None and body["approvedAt"] is None
    assert "integrationRecords" not in body
    assert [h["action"] for h in body["history"]] == ["created"]
    assert body["history"][0]["by"] == ADMIN
    assert response.headers["ETag"].startswith('"')
    assert response.headers["Location"].endswith(f"/api/configs/{body['id']}")
    assert response.headers["Cache-Control"] == "no-store"
    assert api.probe.probed == [FHIR]


def test_get_and_list(api: Portal) -> None:
    first = created_id(api)
    second = created_id(api, url=FHIR, env="production")
    got = api.get(first)
    assert got.status_code == 200 and json_of(got)["id"] == first
    assert got.headers["ETag"]
    listed = api.call(portal.portal_configs, "GET", "configs")
    assert [c["id"] for c in json_of(listed)] == [first, second]
    # the approver sees the configs naming them; another user sees none
    as_approver = api.call(portal.portal_configs, "GET", "configs", as_user=APPROVER.upper())
    assert len(json_of(as_approver)) == 2
    other = api.call(portal.portal_configs, "GET", "configs", as_user="nurse@contoso.example")
    assert json_of(other) == []


def test_approver_reads_own_config_non_approver_gets_403(api: Portal) -> None:
    config_id = created_id(api)
    assert api.get(config_id, as_user=APPROVER).status_code == 200
    denied = api.get(config_id, as_user="nurse@contoso.example")
    assert denied.status_code == 403
    assert denied.mimetype == "application/problem+json"


def test_auditor_reads_config_and_history_but_cannot_write(api: Portal) -> None:
    config_id = created_id(api)
    auditor = api.token("auditor@contoso.example", roles=("Connector.Auditor",))
    assert api.get(config_id, token=auditor).status_code == 200
    history = api.call(
        portal.portal_config_history,
        "GET",
        f"configs/{config_id}/history",
        route={"id": config_id},
        token=auditor,
    )
    assert history.status_code == 200 and json_of(history)[0]["action"] == "created"
    assert api.create(token=auditor, url=FHIR + "/other").status_code == 403
    assert api.delete(config_id, token=auditor).status_code == 403


def test_tenant_isolation(api: Portal) -> None:
    config_id = created_id(api)
    other_admin = api.entra.token(tid=TENANT_B, upn="admin@fabrikam.example")
    assert api.get(config_id, token=other_admin).status_code == 404
    assert (
        api.put(config_id, _edit(), token=other_admin, headers={"If-Match": "*"}).status_code == 404
    )
    assert api.delete(config_id, token=other_admin).status_code == 404
    assert api.approve(config_id, token=other_admin).status_code == 404
    assert api.start_signin(config_id, token=other_admin).status_code == 404
    listed = api.call(portal.portal_configs, "GET", "configs", token=other_admin)
    assert json_of(listed) == []
    # and the same URL is free for the other tenant
    assert api.create(token=other_admin).status_code == 201


@pytest.mark.parametrize("bad_id", ["nope", "a/b", "x" * 65, "../x", "%00"])
def test_unknown_or_malformed_ids_are_404(api: Portal, bad_id: str) -> None:
    assert api.get(bad_id).status_code == 404


# --- authentication / authorization -------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "Basic YWRtaW46cGFzcw==", "Bearer", "Bearer not-a-jwt"],
)
def test_401_without_a_usable_token(api: Portal, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = api.call(portal.portal_configs, "GET", "configs", as_user=None, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert json_of(response)["correlationId"]


@pytest.mark.parametrize(
    "kw",
    [{"lifetime": -3600}, {"aud": "api://other"}, {"alg": "none"}, {"alg": "HS256"}],
)
def test_401_for_bad_tokens(api: Portal, kw: dict[str, Any]) -> None:
    response = api.create(token=api.token(**kw))
    assert response.status_code == 401


def test_401_for_unknown_kid(api: Portal) -> None:
    rogue = api.entra.add_key(publish=False)
    assert api.create(token=api.token(kid=rogue)).status_code == 401


def test_upn_claim_identifies_the_approver_too(api: Portal) -> None:
    config_id = created_id(api)
    token = api.entra.token(upn=APPROVER, roles=(), upn_claim="upn")
    assert api.get(config_id, token=token).status_code == 200


def test_403_without_admin_role(api: Portal) -> None:
    response = api.create(as_user=APPROVER)
    assert response.status_code == 403
    assert "Connector.Admin" in json_of(response)["detail"]


# --- input validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"approverUpn": APPROVER, "environment": "test"}, "fhirBaseUrl"),
        ({"fhirBaseUrl": FHIR, "approverUpn": "not an upn", "environment": "test"}, "approverUpn"),
        ({"fhirBaseUrl": FHIR, "approverUpn": APPROVER, "environment": "staging"}, "environment"),
        ({"fhirBaseUrl": FHIR, "approverUpn": APPROVER, "environment": "test", "x": 1}, "x"),
        ({"fhirBaseUrl": 5, "approverUpn": APPROVER, "environment": "test"}, "fhirBaseUrl"),
        (
            {
                "fhirBaseUrl": FHIR,
                "approverUpn": APPROVER,
                "environment": "test",
                "ehrVendor": "cerner",
            },
            "ehrVendor",
        ),
        (
            {"fhirBaseUrl": FHIR, "approverUpn": APPROVER, "environment": "test", "id": "x"},
            "id",
        ),
    ],
)
def test_400_names_the_wrong_field(api: Portal, body: dict[str, Any], field: str) -> None:
    response = api.call(portal.portal_configs, "POST", "configs", body=body)
    assert response.status_code == 400
    problem = json_of(response)
    assert problem["field"] == field
    assert any(e["field"] == field and e["message"] for e in problem["errors"])
    assert field in problem["detail"]


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"x"', b"\xff\xfe"])
def test_400_for_non_object_bodies(api: Portal, raw: bytes) -> None:
    assert api.call(portal.portal_configs, "POST", "configs", raw=raw).status_code == 400


def test_413_for_large_bodies(api: Portal) -> None:
    body = {"fhirBaseUrl": FHIR, "approverUpn": APPROVER, "environment": "test"}
    raw = json.dumps({**body, "pad": "x" * 70_000}).encode()
    assert api.call(portal.portal_configs, "POST", "configs", raw=raw).status_code == 413


def test_url_check_failure_is_a_400_with_its_code(api: Portal) -> None:
    from connector_core.adapters.fhir_probe import _problem

    api.probe.failures[FHIR] = _problem("fhir-version-dstu2", "This is a FHIR DSTU2 endpoint.")
    response = api.create()
    assert response.status_code == 400
    problem = json_of(response)
    assert problem["code"] == "fhir-version-dstu2" and problem["field"] == "fhirBaseUrl"
    assert isinstance(api.probe.failures[FHIR], InvalidInputError)


# --- duplicates -------------------------------------------------------------------------------


def test_409_with_existing_id_for_the_same_url_and_environment(api: Portal) -> None:
    first = created_id(api)
    again = api.create(url="HTTPS://FHIR.Example-Health.TEST:443/api/FHIR/R4/")
    assert again.status_code == 409
    assert json_of(again)["existingId"] == first
    assert api.probe.probed == [FHIR]  # the duplicate is answered before any network call
    assert api.create(env="production").status_code == 201


# --- concurrency --------------------------------------------------------------------------------


def _edit(url: str = FHIR, approver: str = APPROVER, env: str = "test") -> dict[str, str]:
    return {"fhirBaseUrl": url, "approverUpn": approver, "environment": env}


def test_put_needs_if_match_and_refuses_stale_etags(api: Portal) -> None:
    created = api.create()
    config_id, etag = json_of(created)["id"], created.headers["ETag"]
    assert api.put(config_id, _edit(approver="other@contoso.example")).status_code == 428
    ok = api.put(config_id, _edit(approver="other@contoso.example"), headers={"If-Match": etag})
    assert ok.status_code == 200
    assert ok.headers["ETag"] != etag
    body = json_of(ok)
    assert body["approverUpn"] == "other@contoso.example"
    assert body["history"][-1] == {
        "at": body["updatedAt"],
        "by": ADMIN,
        "action": "updated",
        "fields": ["approver_upn"],
    }
    stale = api.put(config_id, _edit(approver="third@contoso.example"), headers={"If-Match": etag})
    assert stale.status_code == 412
    assert json_of(stale)["currentEtag"] == ok.headers["ETag"]


def test_put_without_changes_keeps_the_version(api: Portal) -> None:
    created = api.create()
    config_id, etag = json_of(created)["id"], created.headers["ETag"]
    same = api.put(config_id, _edit(approver=APPROVER.upper()), headers={"If-Match": etag})
    assert same.status_code == 200 and same.headers["ETag"] == etag


def test_put_to_an_already_registered_url_is_409(api: Portal) -> None:
    first = created_id(api)
    other = api.create(url=FHIR + "/other")
    response = api.put(json_of(other)["id"], _edit(), headers={"If-Match": other.headers["ETag"]})
    assert response.status_code == 409 and json_of(response)["existingId"] == first


def test_put_with_a_new_url_probes_it(api: Portal) -> None:
    created = api.create()
    config_id = json_of(created)["id"]
    response = api.put(
        config_id, _edit(url=FHIR + "2"), headers={"If-Match": created.headers["ETag"]}
    )
    assert response.status_code == 200
    assert api.probe.probed == [FHIR, FHIR + "2"]


def test_delete_honours_if_match(api: Portal) -> None:
    created = api.create()
    config_id = json_of(created)["id"]
    assert api.delete(config_id, headers={"If-Match": '"stale"'}).status_code == 412
    assert api.delete(config_id, as_user=APPROVER).status_code == 403
    assert api.delete(config_id, headers={"If-Match": created.headers["ETag"]}).status_code == 204
    assert api.get(config_id).status_code == 404
    assert api.delete(config_id).status_code == 404
    assert api.create().status_code == 201  # the URL is free again


# --- EHR sign-in and approval ------------------------------------------------------------------


def test_ehr_signin_authorize_url(api: Portal) -> None:
    config_id = created_id(api)
    response = api.start_signin(config_id)
    assert response.status_code == 200
    body = json_of(response)
    assert body["expiresIn"] == 600
    sent = api.smart.last_authorize
    assert sent["scope"] == "openid fhirUser"
    assert sent["aud"] == FHIR
    assert sent["redirect_uri"] == "http://127.0.0.1:7071/api/ehr-signin/callback"
    assert sent["client_id"] == "vv-connector-test"
    assert len(sent["code_challenge"]) == 43 and sent["nonce"]
    # the state is sealed: nothing readable in it
    assert APPROVER not in sent["state"] and config_id not in sent["state"]


def test_only_the_approver_signs_in_and_approves(api: Portal) -> None:
    config_id = created_id(api)
    assert api.start_signin(config_id, as_user=ADMIN).status_code == 403
    assert api.approve(config_id, as_user=ADMIN).status_code == 403
    other_tenant_same_upn = api.entra.token(tid=TENANT_B, upn=APPROVER, roles=())
    assert api.approve(config_id, token=other_tenant_same_upn).status_code == 404


def test_approval_needs_ehr_signin_first(api: Portal) -> None:
    config_id = created_id(api)
    response = api.approve(config_id)
    assert response.status_code == 409
    assert "Sign in to the EHR first" in json_of(response)["detail"]


def test_full_flow_signin_approve_records(api: Portal) -> None:
    config_id = created_id(api)
    done = api.sign_in(config_id)
    assert done.status_code == 200 and done.mimetype == "text/html"
    assert "EHR sign-in complete" in done.get_body().decode()
    signed = json_of(api.get(config_id))
    assert signed["ehrValidatedBy"] == APPROVER and signed["ehrValidatedAt"]
    approved = api.approve(config_id)
    assert approved.status_code == 200
    body = json_of(approved)
    assert body["status"] == "approved" and body["approvedBy"] == APPROVER
    records = {r["type"]: r for r in body["integrationRecords"]}
    base = "http://127.0.0.1:7071/api"
    assert records["provider"]["launchUrl"] == f"{base}/launch/provider/{config_id}"
    assert records["patient"]["launchUrl"] == f"{base}/launch/patient/{config_id}"
    assert {r["redirectUri"] for r in records.values()} == {f"{base}/launch/callback"}
    assert {r["clientId"] for r in records.values()} == {"vv-connector-test"}
    assert {r["jwksUrl"] for r in records.values()} == {f"{base}/.well-known/jwks.json"}
    assert records["provider"]["scopes"][:3] == ["launch", "openid", "fhirUser"]
    assert all(s.startswith("patient/") for s in records["patient"]["scopes"][3:])
    assert body["backendServices"]["scopes"] == ["system/AuditEvent.write"]
    assert [h["action"] for h in body["history"]] == ["created", "ehr_signin", "approved"]
    # admins see the records too, on GET
    assert json_of(api.get(config_id))["integrationRecords"] == body["integrationRecords"]


def test_signin_state_is_single_use(api: Portal) -> None:
    config_id = created_id(api)
    started = api.start_signin(config_id)
    state = parse_qs(urlsplit(json_of(started)["authorizeUrl"]).query)["state"][0]
    code = api.smart.issue_code()
    assert api.callback({"code": code, "state": state}).status_code == 200
    replay = api.callback({"code": code, "state": state})
    assert replay.status_code == 409 and replay.mimetype == "text/html"
    assert "only once" in replay.get_body().decode()


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 400),
        ({"state": "forged", "code": "x"}, 401),
        ({"state": "A" * 100, "code": "x"}, 401),
    ],
)
def test_callback_errors_are_html_pages(api: Portal, params: dict[str, str], status: int) -> None:
    response = api.callback(params)
    assert response.status_code == status and response.mimetype == "text/html"
    assert "correlation id" in response.get_body().decode()


def test_callback_with_ehr_error_is_refused(api: Portal) -> None:
    config_id = created_id(api)
    started = api.start_signin(config_id)
    state = parse_qs(urlsplit(json_of(started)["authorizeUrl"]).query)["state"][0]
    response = api.callback({"error": "access_denied", "state": state})
    assert response.status_code == 403
    assert "access_denied" in response.get_body().decode()
    assert json_of(api.get(config_id))["ehrValidatedAt"] is None


def test_callback_redirects_to_the_portal_when_configured(api: Portal) -> None:
    from tests.helpers import make_settings

    api.container.settings = make_settings(
        ENTRA_AUTHORITY_HOST=AUTHORITY, CONNECTOR_PORTAL_URL="https://portal.example/app"
    )
    config_id = created_id(api)
    done = api.sign_in(config_id)
    assert done.status_code == 302
    assert done.headers["Location"] == (
        f"https://portal.example/app?configId={config_id}&ehrSignin=ok"
    )


def test_signin_older_than_30_minutes_does_not_count(api: Portal) -> None:
    config_id = created_id(api)
    assert api.sign_in(config_id).status_code == 200
    later = utcnow() + timedelta(minutes=31)
    api.container.clock = lambda: later
    assert api.approve(config_id).status_code == 409


def test_put_after_approval_needs_a_new_approval(api: Portal) -> None:
    config_id = created_id(api)
    api.sign_in(config_id)
    approved = api.approve(config_id)
    assert approved.status_code == 200
    changed = api.put(
        config_id, _edit(env="production"), headers={"If-Match": approved.headers["ETag"]}
    )
    assert changed.status_code == 200
    body = json_of(changed)
    assert body["status"] == "pending_approval"
    assert body["approvedAt"] is None and body["ehrValidatedAt"] is None
    assert "integrationRecords" not in body
    assert api.approve(config_id).status_code == 409  # the old sign-in no longer counts
    api.sign_in(config_id)
    assert api.approve(config_id).status_code == 200


def test_signin_when_the_ehr_is_down_is_502(api: Portal) -> None:
    config_id = created_id(api)
    api.smart.down = True
    assert api.start_signin(config_id).status_code == 502


def test_approver_change_invalidates_pending_signin(api: Portal) -> None:
    created = api.create()
    config_id = json_of(created)["id"]
    started = api.start_signin(config_id)
    state = parse_qs(urlsplit(json_of(started)["authorizeUrl"]).query)["state"][0]
    api.put(
        config_id,
        _edit(approver="other@contoso.example"),
        headers={"If-Match": created.headers["ETag"]},
    )
    response = api.callback({"code": api.smart.issue_code(), "state": state})
    assert response.status_code == 409
    assert json_of(api.get(config_id))["ehrValidatedAt"] is None


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_document_covers_every_portal_route(api: Portal) -> None:
    response = api.call(portal.portal_openapi, "GET", "openapi.json", as_user=None)
    assert response.status_code == 200
    doc = json_of(response)
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": "http://127.0.0.1:7071/api"}]
    documented = {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    registered = set()
    for function in portal.bp._function_builders:  # every route of the blueprint
        built = function.build()
        trigger = built.get_bindings()[0]
        route = "/" + trigger.route
        for method in trigger.methods:
            registered.add((route, str(method.value if hasattr(method, "value") else method)))
    assert registered == documented
    schemas = doc["components"]["schemas"]
    assert set(schemas["ConfigInput"]["required"]) == {"fhirBaseUrl", "approverUpn", "environment"}
    assert schemas["ConfigInput"]["additionalProperties"] is False
    assert "integrationRecords" in schemas["ConfigOut"]["properties"]


def test_changed_or_deleted_configs_leave_the_launch_cache(api: Portal) -> None:
    forgotten: list[str] = []

    class Cache:
        def forget_config(self, config_id: str) -> None:
            forgotten.append(config_id)

    api.container.__dict__["launch_cache"] = Cache()
    created = api.create()
    config_id = json_of(created)["id"]
    api.put(config_id, _edit(env="production"), headers={"If-Match": created.headers["ETag"]})
    api.delete(config_id)
    assert forgotten == [config_id, config_id]
