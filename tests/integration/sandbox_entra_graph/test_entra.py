"""The Entra ID stand-in over real HTTPS, driven by msal itself and by a scripted client."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import msal
import pytest

from devtools.sandbox import Sandbox
from devtools.sandbox.entra import ADMIN_ROLE, FORGED_KINDS, GRAPH_AUDIENCE, SENSITIVE_VALUES
from tests.integration.sandbox_entra_graph.conftest import account_links


def _callback(sandbox: Sandbox) -> str:
    return f"{sandbox.connector_url}/api/launch/sso-callback"


def _msal_app(sandbox: Sandbox, tenant: str) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        sandbox.entra.client_id,
        client_credential=sandbox.entra.client_secret,
        authority=f"{sandbox.entra_url}/{tenant}",
        instance_discovery=False,
    )


def _pick(https: httpx.Client, auth_uri: str, upn: str) -> dict[str, str]:
    """Open the account picker, click the account, return the redirect's query parameters."""
    page = https.get(auth_uri)
    assert page.status_code == 200
    links = account_links(page.text)
    assert upn in links, sorted(links)
    redirect = https.get(links[upn])
    assert redirect.status_code == 302
    location = redirect.headers["location"]
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def _verifier_jwks(sandbox: Sandbox, tid: str) -> jwt.PyJWKClient:
    context = ssl.create_default_context(cafile=str(sandbox.ca_bundle))
    return jwt.PyJWKClient(sandbox.entra.jwks_uri(tid), ssl_context=context, cache_keys=False)


def _validate_portal(sandbox: Sandbox, token: str, tid: str) -> dict[str, Any]:
    """A correct validator, as the connector's portal API must do it."""
    header = jwt.get_unverified_header(token)
    if header.get("alg") != "RS256":
        raise jwt.InvalidAlgorithmError(header.get("alg"))
    key = _verifier_jwks(sandbox, tid).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=f"api://{sandbox.entra.client_id}",
        issuer=sandbox.entra.issuer(tid),
        options={"require": ["exp", "iss", "aud", "tid"]},
    )
    return claims


def test_discovery_follows_entra_layout(
    sandbox: Sandbox, https: httpx.Client, contoso: str
) -> None:
    host = sandbox.entra_url
    doc = https.get(f"{host}/{contoso}/v2.0/.well-known/openid-configuration").json()
    assert doc["issuer"] == f"{host}/{contoso}/v2.0"
    assert doc["authorization_endpoint"] == f"{host}/{contoso}/oauth2/v2.0/authorize"
    assert doc["token_endpoint"] == f"{host}/{contoso}/oauth2/v2.0/token"
    assert doc["jwks_uri"] == f"{host}/{contoso}/discovery/v2.0/keys"
    common = https.get(f"{host}/organizations/v2.0/.well-known/openid-configuration").json()
    assert common["issuer"] == f"{host}/{{tenantid}}/v2.0"
    assert common["token_endpoint"] == f"{host}/organizations/oauth2/v2.0/token"
    by_domain = https.get(
        f"{host}/contosohealth.onmicrosoft.com/v2.0/.well-known/openid-configuration"
    ).json()
    assert by_domain["issuer"] == doc["issuer"]
    missing = https.get(
        f"{host}/00000000-1111-2222-3333-444444444444/v2.0/.well-known/openid-configuration"
    )
    assert missing.status_code == 400
    assert missing.json()["error_codes"] == [90002]
    keys = https.get(doc["jwks_uri"]).json()["keys"]
    assert keys and all(k["kty"] == "RSA" and k["kid"] for k in keys)


@pytest.mark.filterwarnings("ignore:response_mode='form_post' is recommended")
def test_msal_auth_code_flow_with_pkce_and_nonce(
    sandbox: Sandbox, https: httpx.Client, msal_trust: None, contoso: str
) -> None:
    app = _msal_app(sandbox, contoso)
    flow = app.initiate_auth_code_flow(["User.Read"], redirect_uri=_callback(sandbox))
    query = parse_qs(urlsplit(flow["auth_uri"]).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["nonce"]
    clinician = next(u for u in sandbox.entra.users_in(contoso) if u.kind == "clinician")
    response = _pick(https, flow["auth_uri"], clinician.upn)
    assert response["state"] == flow["state"]
    assert json.loads(base64.urlsafe_b64decode(response["client_info"] + "==")) == {
        "uid": clinician.oid,
        "utid": contoso,
    }
    result = app.acquire_token_by_auth_code_flow(flow, response)  # msal checks state and nonce
    assert "error" not in result, result
    claims = result["id_token_claims"]
    assert claims["oid"] == clinician.oid
    assert claims["tid"] == contoso
    assert claims["preferred_username"] == clinician.upn
    assert claims["name"] == clinician.display_name
    assert claims["aud"] == sandbox.entra.client_id
    assert claims["iss"] == sandbox.entra.issuer(contoso)
    # the id_token is really signed by a key of the JWKS
    key = _verifier_jwks(sandbox, contoso).get_signing_key_from_jwt(result["id_token"])
    jwt.decode(
        result["id_token"],
        key.key,
        algorithms=["RS256"],
        audience=sandbox.entra.client_id,
        issuer=sandbox.entra.issuer(contoso),
    )
    accounts = app.get_accounts()
    assert accounts and accounts[0]["home_account_id"] == f"{clinician.oid}.{contoso}"


def test_msal_client_credentials_for_graph(
    sandbox: Sandbox, msal_trust: None, fabrikam: str
) -> None:
    app = _msal_app(sandbox, fabrikam)
    result = app.acquire_token_for_client(["https://graph.microsoft.com/.default"])
    assert "access_token" in result, result
    key = _verifier_jwks(sandbox, fabrikam).get_signing_key_from_jwt(result["access_token"])
    claims = jwt.decode(
        result["access_token"],
        key.key,
        algorithms=["RS256"],
        audience=GRAPH_AUDIENCE,
        issuer=f"https://sts.windows.net/{fabrikam}/",
    )
    assert claims["tid"] == fabrikam
    assert claims["appid"] == sandbox.entra.client_id
    assert "OnlineMeetings.ReadWrite.All" in claims["roles"]
    assert claims["idtyp"] == "app"


def _manual_authorize(
    sandbox: Sandbox,
    https: httpx.Client,
    tid: str,
    *,
    verifier: str,
    redirect_uri: str,
    upn: str | None = None,
) -> dict[str, str]:
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    params = {
        "client_id": sandbox.entra.client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": "openid profile offline_access",
        "state": secrets.token_urlsafe(16),
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    url = f"{sandbox.entra_url}/{tid}/oauth2/v2.0/authorize?{urlencode(params)}"
    upn = upn or sandbox.entra.users_in(tid)[0].upn
    response = _pick(https, url, upn)
    assert response["state"] == params["state"]
    return response


def _redeem(
    sandbox: Sandbox,
    https: httpx.Client,
    tid: str,
    code: str,
    verifier: str,
    redirect_uri: str,
    secret: str | None = None,
) -> httpx.Response:
    return https.post(
        sandbox.entra.token_endpoint(tid),
        data={
            "grant_type": "authorization_code",
            "client_id": sandbox.entra.client_id,
            "client_secret": secret or sandbox.entra.client_secret,
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
            "scope": "openid profile",
        },
    )


def test_wrong_pkce_verifier_and_reused_code_are_refused(
    sandbox: Sandbox, https: httpx.Client, contoso: str
) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _manual_authorize(
        sandbox, https, contoso, verifier=verifier, redirect_uri=_callback(sandbox)
    )["code"]
    wrong = _redeem(sandbox, https, contoso, code, secrets.token_urlsafe(48), _callback(sandbox))
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    assert wrong.json()["error_codes"] == [501481]
    # a failed redemption consumed the code
    again = _redeem(sandbox, https, contoso, code, verifier, _callback(sandbox))
    assert again.json()["error_codes"] == [54005]

    code = _manual_authorize(
        sandbox, https, contoso, verifier=verifier, redirect_uri=_callback(sandbox)
    )["code"]
    first = _redeem(sandbox, https, contoso, code, verifier, _callback(sandbox))
    assert first.status_code == 200, first.text
    assert first.json()["refresh_token"]
    reused = _redeem(sandbox, https, contoso, code, verifier, _callback(sandbox))
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    assert reused.json()["error_codes"] == [54005]


def test_wrong_redirect_uri_and_client_are_refused(
    sandbox: Sandbox, https: httpx.Client, contoso: str
) -> None:
    params = {
        "client_id": sandbox.entra.client_id,
        "response_type": "code",
        "redirect_uri": "https://attacker.example/cb",
        "scope": "openid",
        "state": "s",
    }
    page = https.get(f"{sandbox.entra_url}/{contoso}/oauth2/v2.0/authorize?{urlencode(params)}")
    assert page.status_code == 400  # an error page, never a redirect to the unregistered URI
    assert "AADSTS50011" in page.text
    params.update(client_id="unknown-client", redirect_uri=_callback(sandbox))
    page = https.get(f"{sandbox.entra_url}/{contoso}/oauth2/v2.0/authorize?{urlencode(params)}")
    assert page.status_code == 400 and "AADSTS700016" in page.text

    verifier = secrets.token_urlsafe(48)
    code = _manual_authorize(
        sandbox, https, contoso, verifier=verifier, redirect_uri=_callback(sandbox)
    )["code"]
    mismatch = _redeem(
        sandbox, https, contoso, code, verifier, f"{sandbox.connector_url}/api/other"
    )
    assert mismatch.json()["error_codes"] == [500112]

    code = _manual_authorize(
        sandbox, https, contoso, verifier=verifier, redirect_uri=_callback(sandbox)
    )["code"]
    bad_secret = _redeem(
        sandbox, https, contoso, code, verifier, _callback(sandbox), secret="wrong"
    )
    assert bad_secret.status_code == 401
    assert bad_secret.json()["error"] == "invalid_client"


def test_disabled_user_sign_in_is_denied(
    sandbox: Sandbox, https: httpx.Client, contoso: str
) -> None:
    user = next(u for u in sandbox.entra.users_in(contoso) if u.kind == "clinician")
    sandbox.entra.set_user_disabled(user.oid, True)
    params = {
        "client_id": sandbox.entra.client_id,
        "response_type": "code",
        "redirect_uri": _callback(sandbox),
        "scope": "openid",
        "state": "st-1",
    }
    response = _pick(
        https, f"{sandbox.entra_url}/{contoso}/oauth2/v2.0/authorize?{urlencode(params)}", user.upn
    )
    assert response["error"] == "access_denied"
    assert response["error_description"].startswith("AADSTS50057")
    assert response["state"] == "st-1"
    assert "code" not in response


def test_token_endpoint_fault_then_success(
    sandbox: Sandbox, https: httpx.Client, fabrikam: str
) -> None:
    sandbox.entra.fail_next("token", status=503, count=1, retry_after=2)
    data = {
        "grant_type": "client_credentials",
        "client_id": sandbox.entra.client_id,
        "client_secret": sandbox.entra.client_secret,
        "scope": "https://graph.microsoft.com/.default",
    }
    failed = https.post(sandbox.entra.token_endpoint(fabrikam), data=data)
    assert failed.status_code == 503
    assert failed.headers["retry-after"] == "2"
    assert failed.json()["error"] == "temporarily_unavailable"
    assert https.post(sandbox.entra.token_endpoint(fabrikam), data=data).status_code == 200


def test_portal_tokens_verify_against_jwks_and_rotation(sandbox: Sandbox, contoso: str) -> None:
    admin = sandbox.entra.user_by_upn("admin@contosohealth.onmicrosoft.com")
    token = sandbox.entra.mint_access_token(tid=contoso, oid=admin.oid, roles=[ADMIN_ROLE])
    claims = _validate_portal(sandbox, token, contoso)
    assert claims["oid"] == admin.oid
    assert claims["roles"] == [ADMIN_ROLE]
    assert claims["preferred_username"] == admin.upn
    assert claims["ver"] == "2.0"
    assert sandbox.entra.mint_user_token(admin.upn) != token

    old_kid = jwt.get_unverified_header(token)["kid"]
    new_kid = sandbox.entra.rotate_signing_key()
    try:
        context = ssl.create_default_context(cafile=str(sandbox.ca_bundle))
        with httpx.Client(verify=context) as client:
            kids = [k["kid"] for k in client.get(sandbox.entra.jwks_uri(contoso)).json()["keys"]]
        assert kids == [old_kid, new_kid]
        fresh = sandbox.entra.mint_access_token(tid=contoso, oid=admin.oid)
        assert jwt.get_unverified_header(fresh)["kid"] == new_kid
        _validate_portal(sandbox, fresh, contoso)
        _validate_portal(sandbox, token, contoso)  # old tokens stay valid until the key is retired
    finally:
        sandbox.entra.retire_signing_key(old_kid)
    with pytest.raises(jwt.PyJWTError):
        _validate_portal(sandbox, token, contoso)


@pytest.mark.parametrize("kind", FORGED_KINDS)
def test_forged_tokens_fail_a_correct_validator(sandbox: Sandbox, contoso: str, kind: str) -> None:
    admin = sandbox.entra.user_by_upn("admin@contosohealth.onmicrosoft.com")
    token = sandbox.entra.mint_forged_token(kind, tid=contoso, oid=admin.oid)
    with pytest.raises((jwt.PyJWTError, jwt.exceptions.PyJWKClientError)):
        _validate_portal(sandbox, token, contoso)


def test_seed_matches_ehr_and_is_exported() -> None:
    from devtools.sandbox import seed
    from devtools.sandbox.entra import TENANTS, USERS

    names = {t.name for t in TENANTS.values()}
    assert names == {"Contoso Health", "Fabrikam Clinics"}
    by_prac = {u.ehr_practitioner_id: u for u in USERS.values() if u.ehr_practitioner_id}
    for prac_id in seed.CLINICIAN_IDS:
        assert by_prac[prac_id].display_name == seed.PRACTITIONERS[prac_id].name
        assert by_prac[prac_id].kind == "clinician"
    kinds = {(u.tid, u.kind) for u in USERS.values()}
    for tid in TENANTS:
        assert {(tid, "admin"), (tid, "approver"), (tid, "clinician")} <= kinds
    assert all(u.display_name in SENSITIVE_VALUES for u in USERS.values())
