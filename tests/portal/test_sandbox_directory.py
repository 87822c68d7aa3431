"""The Graph stand-in's directory search answers as Microsoft Graph does for
``GET /v1.0/users?$search=...``: ``ConsistencyLevel: eventual`` required, quoted
``"property:value"`` clauses, displayName tokenized (word prefixes), other properties by
startsWith, the caller's tenant only, and User.ReadBasic.All limited to the basic profile."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from devtools.sandbox.entra import CONTOSO_TID
from tests.stack import Stack

EVENTUAL = {"ConsistencyLevel": "eventual"}


@pytest.fixture
def graph(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=f"{stack.sandbox.graph_url}/v1.0", timeout=10)


def _search(
    graph: httpx.Client,
    token: str,
    search: str,
    headers: dict[str, str] | None = None,
    **params: str,
) -> httpx.Response:
    return graph.get(
        "/users",
        params={"$search": search, **params},
        headers={"Authorization": f"Bearer {token}", **(EVENTUAL if headers is None else headers)},
    )


def _upns(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return {u["userPrincipalName"] for u in body["value"]}


def test_search_needs_consistency_level_eventual(stack: Stack, graph: httpx.Client) -> None:
    token = stack.sandbox.entra.mint_delegated_graph_token(stack.sandbox.entra.persona("admin").upn)
    refused = _search(graph, token, '"displayName:perp"', headers={})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "Request_UnsupportedQuery"
    assert "ConsistencyLevel: eventual" in refused.json()["error"]["message"]


def test_display_names_match_by_word_prefix_and_mail_by_start(
    stack: Stack, graph: httpx.Client
) -> None:
    entra = stack.sandbox.entra
    token = entra.mint_delegated_graph_token(entra.persona("admin").upn)
    analyst = entra.persona("approver").upn
    assert _upns(_search(graph, token, '"displayName:thorn"')) == {analyst}
    assert _upns(_search(graph, token, '"displayName:perp thorn"')) == {analyst}
    assert _upns(_search(graph, token, '"displayName:whistle"')) == set()  # not a word start
    assert _upns(_search(graph, token, '"mail:ehr.an"')) == {analyst}
    assert _upns(_search(graph, token, '"displayName:zzz" OR "mail:ehr.an"')) == {analyst}
    assert _upns(_search(graph, token, '"displayName:perp" AND "mail:admin"')) == set()
    both = '"mail:admin" OR "mail:ehr.an"'
    counted = _search(graph, token, both, **{"$count": "true", "$top": "1"}).json()
    assert counted["@odata.count"] == 2 and len(counted["value"]) == 1


def test_only_the_callers_tenant_and_only_the_basic_profile(
    stack: Stack, graph: httpx.Client
) -> None:
    entra = stack.sandbox.entra
    token = entra.mint_delegated_graph_token(entra.persona("admin").upn)
    everyone = _upns(_search(graph, token, '"mail:a" OR "mail:e" OR "mail:i" OR "mail:f"'))
    assert everyone and all(u.endswith("@contosohealth.onmicrosoft.com") for u in everyone)
    fabrikam = entra.tenant_by_name("Fabrikam Clinics")
    assert all(u.tid != fabrikam.tid for u in entra.users.values() if u.upn in everyone)
    basic = _search(graph, token, '"mail:a"', **{"$select": "id,displayName,jobTitle"})
    assert basic.status_code == 403
    assert basic.json()["error"]["code"] == "Authorization_RequestDenied"
    selected = _search(graph, token, '"mail:admin"', **{"$select": "id,userPrincipalName"}).json()
    assert set(selected["value"][0]) == {"id", "userPrincipalName"}
    assert "$metadata#users(id,userPrincipalName)" in selected["@odata.context"]


def test_malformed_searches_and_tokens_are_refused(stack: Stack, graph: httpx.Client) -> None:
    entra = stack.sandbox.entra
    token = entra.mint_delegated_graph_token(entra.persona("admin").upn)
    assert _search(graph, token, "displayName:perp").status_code == 400  # not quoted
    assert _search(graph, token, '"jobTitle:x"').status_code == 400  # not searchable
    no_scope = entra.mint_delegated_graph_token(entra.persona("admin").upn, scopes="User.Read")
    assert _search(graph, no_scope, '"mail:a"').status_code == 403
    app_only = entra.mint_graph_token(CONTOSO_TID)  # meetings permissions only
    assert _search(graph, app_only, '"mail:a"').status_code == 403
    assert _search(graph, "not-a-token", '"mail:a"').status_code == 401
