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
    EHR_AS_ISSUER,
    TENANT_A,
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
        """The EHR's answer exactly as given (see ``answer`` for one as the EHR sends it)."""
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

    def answer(self, state: str, **params: str | None) -> func.HttpResponse:
        """The EHR's answer as the EHR sends it: a fresh code and RFC 9207 ``iss`` (the
        authorization server's issuer). A ``None`` value leaves that parameter out."""
        sent: dict[str, str | None] = {
            "code": self.smart.issue_code(),
            "state": state,
            "iss": EHR_AS_ISSUER,
            **params,
        }
        return self.callback({k: v for k, v in sent.items() if v is not None})

    def sign_in(self, config_id: str, **kw: Any) -> func.HttpResponse:
        return self.answer(self.signin_state(config_id, **kw))

    def signin_state(self, config_id: str, **kw: Any) -> str:
        started = self.start_signin(config_id, **kw)
        assert started.status_code == 200, started.get_body()
        return state_of(started)


def json_of(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body())


def state_of(started: func.HttpResponse) -> str:
    return str(parse_qs(urlsplit(json_of(started)["authorizeUrl"]).query)["state"][0])


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


def json_of_etag(api: Portal, config_id: str) -> str:
    """The config's current ETag (an admin's GET)."""
    return str(api.get(config_id).headers["ETag"])


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
    state = api.signin_state(config_id)
    code = api.smart.issue_code()
    answer = {"code": code, "state": state, "iss": EHR_AS_ISSUER}
    assert api.callback(answer).status_code == 200
    replay = api.callback(answer)
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
    state = api.signin_state(config_id)
    response = api.answer(state, code=None, error="access_denied")
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
    state = api.signin_state(config_id)
    changed = api.put(
        config_id,
        _edit(approver="other@contoso.example"),
        headers={"If-Match": json_of_etag(api, config_id)},
    )
    assert changed.status_code == 200
    response = api.answer(state)
    assert response.status_code == 409
    assert json_of(api.get(config_id))["ehrValidatedAt"] is None


# --- approver bound by Entra object id ---------------------------------------------------------


def _oid(upn: str, tid: str = TENANT_A) -> str:
    """The object id FakeEntra gives ``upn`` by default."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tid}/{upn}"))


def _stored(api: Portal, config_id: str) -> Any:
    return api.container.configs.get(TENANT_A, config_id).record


IMPOSTOR_OID = "99999999-9999-4999-8999-999999999999"


def test_first_ehr_signin_binds_the_approver_by_object_id(api: Portal) -> None:
    config_id = created_id(api)
    assert _stored(api, config_id).approver_oid is None
    state = api.signin_state(config_id)
    assert _stored(api, config_id).approver_oid == _oid(APPROVER)
    # Someone else who later holds the same UPN (a reassigned name) is not the approver.
    impostor = api.entra.token(upn=APPROVER, roles=(), extra={"oid": IMPOSTOR_OID})
    assert api.get(config_id, token=impostor).status_code == 403
    assert api.start_signin(config_id, token=impostor).status_code == 403
    assert api.approve(config_id, token=impostor).status_code == 403
    listed = api.call(portal.portal_configs, "GET", "configs", token=impostor)
    assert json_of(listed) == []
    assert _stored(api, config_id).approver_oid == _oid(APPROVER)
    # The bound approver goes on as before.
    assert api.answer(state).status_code == 200
    assert api.approve(config_id).status_code == 200


def test_impostor_cannot_complete_a_signin_started_before_a_rebinding(api: Portal) -> None:
    config_id = created_id(api)
    impostor = api.entra.token(upn=APPROVER, roles=(), extra={"oid": IMPOSTOR_OID})
    state = api.signin_state(config_id, token=impostor)  # binds the impostor's oid first...
    api.put(config_id, _edit(approver="other@contoso.example"), headers={"If-Match": "*"})
    api.put(config_id, _edit(), headers={"If-Match": "*"})  # ...the admin resets the binding
    api.signin_state(config_id)  # the real approver binds now
    assert _stored(api, config_id).approver_oid == _oid(APPROVER)
    response = api.answer(state)  # the impostor's pending sign-in no longer counts
    assert response.status_code == 409 and response.mimetype == "text/html"
    assert _stored(api, config_id).ehr_validated_at is None


def test_changing_the_approver_resets_the_binding(api: Portal) -> None:
    config_id = created_id(api)
    api.signin_state(config_id)
    assert _stored(api, config_id).approver_oid == _oid(APPROVER)
    other = "other@contoso.example"
    changed = api.put(config_id, _edit(approver=other), headers={"If-Match": "*"})
    assert changed.status_code == 200
    assert _stored(api, config_id).approver_oid is None
    assert api.start_signin(config_id).status_code == 403  # no longer the approver
    api.signin_state(config_id, as_user=other)
    assert _stored(api, config_id).approver_oid == _oid(other)
    # Naming the first approver again binds whoever signs in next under that name.
    api.put(config_id, _edit(), headers={"If-Match": "*"})
    assert _stored(api, config_id).approver_oid is None
    newcomer = api.entra.token(upn=APPROVER, roles=(), extra={"oid": IMPOSTOR_OID})
    api.signin_state(config_id, token=newcomer)
    assert _stored(api, config_id).approver_oid == IMPOSTOR_OID
    assert api.get(config_id, as_user=APPROVER).status_code == 403


def test_letter_case_of_the_approver_is_no_change_and_keeps_the_binding(api: Portal) -> None:
    config_id = created_id(api)
    api.signin_state(config_id)
    api.put(config_id, _edit(approver=APPROVER.upper()), headers={"If-Match": "*"})
    assert _stored(api, config_id).approver_oid == _oid(APPROVER)


def test_signin_needs_an_object_id_in_the_token(api: Portal) -> None:
    config_id = created_id(api)
    no_oid = api.entra.token(upn=APPROVER, roles=(), extra={"oid": None})
    response = api.start_signin(config_id, token=no_oid)
    assert response.status_code == 403
    assert "object id" in json_of(response)["detail"]
    assert _stored(api, config_id).approver_oid is None


# --- EHR sign-in: a practitioner, and the RFC 9207 issuer --------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "u1", "fhirUser": "https://fhir.example-health.test/api/FHIR/R4/Patient/p1"},
        {"sub": "u1", "fhirUser": "RelatedPerson/r1"},
        {"sub": "u1", "fhirUser": "not a reference"},
        {"sub": "u1"},
    ],
    ids=["patient", "related-person", "garbage", "no-fhirUser"],
)
def test_ehr_signin_by_a_non_practitioner_is_refused(api: Portal, claims: dict[str, str]) -> None:
    config_id = created_id(api)
    api.smart.id_token_claims = claims
    response = api.sign_in(config_id)
    assert response.status_code == 403 and response.mimetype == "text/html"
    page = response.get_body().decode()
    assert "not a practitioner" in page and "staff account" in page
    assert json_of(api.get(config_id))["ehrValidatedAt"] is None


def test_ehr_signin_as_practitioner_role_counts(api: Portal) -> None:
    config_id = created_id(api)
    api.smart.id_token_claims = {"sub": "u1", "fhirUser": "PractitionerRole/pr1"}
    assert api.sign_in(config_id).status_code == 200
    assert json_of(api.get(config_id))["ehrValidatedBy"] == APPROVER


@pytest.mark.parametrize(
    ("iss", "text"),
    [
        (None, "does not say which server"),
        ("", "does not say which server"),
        (FHIR, "another server"),  # the FHIR base URL is not the authorization server
        ("https://evil.example/oauth2", "another server"),
        (EHR_AS_ISSUER + "/", "another server"),
    ],
    ids=["missing", "empty", "fhir-base", "other-server", "trailing-slash"],
)
def test_ehr_signin_answer_must_carry_the_issuer(api: Portal, iss: str | None, text: str) -> None:
    config_id = created_id(api)
    state = api.signin_state(config_id)
    response = api.answer(state, iss=iss)
    assert response.status_code == 401 and response.mimetype == "text/html"
    assert text in response.get_body().decode()
    assert json_of(api.get(config_id))["ehrValidatedAt"] is None
    assert api.answer(state).status_code == 200  # refused before the state was used up


def test_ehr_error_answer_with_a_mixed_up_issuer_is_401(api: Portal) -> None:
    config_id = created_id(api)
    state = api.signin_state(config_id)
    response = api.answer(state, code=None, error="access_denied", iss=FHIR)
    assert response.status_code == 401


def test_issuer_may_be_missing_when_the_ehr_does_not_send_it(api: Portal) -> None:
    config_id = created_id(api)
    api.smart.iss_supported = False
    state = api.signin_state(config_id)
    assert api.answer(state, iss=FHIR).status_code == 401  # present: must still match
    assert api.answer(state, iss=None).status_code == 200


def test_issuer_is_the_one_sealed_when_the_signin_started(api: Portal) -> None:
    config_id = created_id(api)
    state = api.signin_state(config_id)
    api.smart.issuer = "https://elsewhere.example/oauth2"
    assert api.answer(state, iss="https://elsewhere.example/oauth2").status_code == 401


# --- CONNECTOR_ALLOWED_TENANTS ----------------------------------------------------------------


def _allow_tenants(api: Portal, value: str | None) -> None:
    from tests.helpers import make_settings

    api.container.settings = make_settings(
        ENTRA_AUTHORITY_HOST=AUTHORITY, CONNECTOR_ALLOWED_TENANTS=value
    )


def test_listed_tenant_may_use_the_portal(api: Portal) -> None:
    _allow_tenants(api, f"{TENANT_A.upper()}, 33333333-3333-4333-8333-333333333333")
    config_id = created_id(api)
    assert api.get(config_id).status_code == 200


def test_unlisted_tenant_is_403_with_a_clear_message(api: Portal) -> None:
    _allow_tenants(api, TENANT_A)
    other_admin = api.entra.token(tid=TENANT_B, upn="admin@fabrikam.example")
    for response in (
        api.create(token=other_admin),
        api.call(portal.portal_configs, "GET", "configs", token=other_admin),
    ):
        assert response.status_code == 403
        assert response.mimetype == "application/problem+json"
        problem = json_of(response)
        assert "does not serve your organization" in problem["detail"]
        assert "CONNECTOR_ALLOWED_TENANTS" in problem["detail"]
        assert problem["action"] and problem["correlationId"]
    assert api.container.configs.list(TENANT_B) == []


def test_empty_tenant_list_serves_any_tenant(api: Portal) -> None:
    _allow_tenants(api, None)
    other_admin = api.entra.token(tid=TENANT_B, upn="admin@fabrikam.example")
    assert api.create(token=other_admin).status_code == 201
    _allow_tenants(api, "")
    assert api.create(token=other_admin, env="production").status_code == 201


def test_tenant_check_comes_after_token_validation(api: Portal) -> None:
    _allow_tenants(api, TENANT_A)
    forged = api.entra.token(tid=TENANT_B, upn="admin@fabrikam.example", lifetime=-3600)
    assert api.create(token=forged).status_code == 401


# --- the EHR's endpoints: the allowance recorded on the config ---------------------------------

VENDOR_AUTHORIZE = "https://auth.vendor-cloud.example.net/oauth2/authorize"
VENDOR_JWKS = "https://keys.vendor-cloud.example.net/jwks"


def test_create_records_endpoint_hosts_other_than_the_fhir_base(api: Portal) -> None:
    api.probe.endpoints = (VENDOR_AUTHORIZE, f"{FHIR}/oauth2/token", VENDOR_JWKS)
    config_id = created_id(api)
    hosts = ("auth.vendor-cloud.example.net", "keys.vendor-cloud.example.net")
    assert _stored(api, config_id).ehr_endpoint_hosts == hosts
    # the EHR sign-in checks discovery against that allowance, start and callback
    assert api.sign_in(config_id).status_code == 200
    assert api.smart.allowed_hosts == [hosts, hosts]


def test_create_with_endpoints_beside_the_fhir_base_records_none(api: Portal) -> None:
    config_id = created_id(api)
    assert _stored(api, config_id).ehr_endpoint_hosts == ()


def test_update_probes_again_and_a_new_allowance_needs_a_new_approval(api: Portal) -> None:
    config_id = created_id(api)
    api.sign_in(config_id)
    approved = api.approve(config_id)
    assert json_of(approved)["status"] == "approved"
    same = api.put(config_id, _edit(), headers={"If-Match": approved.headers["ETag"]})
    assert same.status_code == 200 and same.headers["ETag"] == approved.headers["ETag"]
    assert api.probe.probed == [FHIR, FHIR]  # probed although the URL did not change
    api.probe.endpoints = (VENDOR_AUTHORIZE, f"{FHIR}/token", None)
    moved = api.put(config_id, _edit(), headers={"If-Match": same.headers["ETag"]})
    assert moved.status_code == 200
    body = json_of(moved)
    assert body["status"] == "pending_approval"
    assert body["history"][-1]["fields"] == ["ehr_endpoint_hosts"]
    assert _stored(api, config_id).ehr_endpoint_hosts == ("auth.vendor-cloud.example.net",)


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
    from functions import reports

    # every route of the portal API's blueprints
    for function in (*portal.bp._function_builders, *reports.bp._function_builders):
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


def test_object_id_letter_case_does_not_break_the_binding(api: Portal) -> None:
    config_id = created_id(api)
    upper = api.entra.token(upn=APPROVER, roles=(), extra={"oid": _oid(APPROVER).upper()})
    state = api.signin_state(config_id, token=upper)
    assert _stored(api, config_id).approver_oid == _oid(APPROVER)
    assert api.answer(state).status_code == 200
    assert api.approve(config_id).status_code == 200  # the same user, lower-case oid
