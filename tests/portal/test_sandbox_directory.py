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


# --- JSON batching and the reports page's name lookup ------------------------------------------


def _contoso_oids(stack: Stack) -> list[str]:
    return [u.oid for u in stack.sandbox.entra.users.values() if u.tid == CONTOSO_TID]


def test_batch_answers_each_request_as_if_alone_and_refuses_what_graph_refuses(
    stack: Stack, graph: httpx.Client
) -> None:
    entra = stack.sandbox.entra
    token = entra.mint_delegated_graph_token(entra.persona("admin").upn)
    auth = {"Authorization": f"Bearer {token}"}
    oid = _contoso_oids(stack)[0]
    steps = [
        {"id": "a", "method": "GET", "url": f"/users?$filter=id in ('{oid}')&$select=id"},
        {"id": "b", "method": "GET", "url": "/users?$search=%22mail:admin%22"},  # no header
    ]
    answered = graph.post("/$batch", json={"requests": steps}, headers=auth)
    assert answered.status_code == 200
    by_id = {r["id"]: r for r in answered.json()["responses"]}
    assert by_id["a"]["status"] == 200 and by_id["a"]["body"]["value"] == [{"id": oid}]
    assert by_id["b"]["status"] == 400  # ConsistencyLevel is per request, as alone
    assert [r["id"] for r in answered.json()["responses"]] == ["b", "a"]  # no order promised

    one = {"method": "GET", "url": "/users"}
    too_many = [{"id": str(n), **one} for n in range(21)]
    for body in (
        {"requests": too_many},
        {"requests": [{"id": "x", **one}, {"id": "X", **one}]},  # ids ignore case
        {
            "requests": [
                {"id": "1", "method": "GET", "url": f"{stack.sandbox.graph_url}/v1.0/users"}
            ]
        },
        {"value": []},
    ):
        assert graph.post("/$batch", json=body, headers=auth).status_code == 400
    unsigned = graph.post("/$batch", json={"requests": [{"id": "1", **one}]})
    assert unsigned.status_code == 401  # the batch's own token, before any request
    app_only = entra.mint_graph_token(CONTOSO_TID)  # genuine, without directory permissions
    refused = graph.post(
        "/$batch",
        json={"requests": [{"id": "1", **one}]},
        headers={"Authorization": f"Bearer {app_only}"},
    )
    assert refused.status_code == 200 and refused.json()["responses"][0]["status"] == 403


def test_names_take_one_batch_for_300_ids_and_keep_what_graph_answered(stack: Stack) -> None:
    from connector_core.adapters.graph_directory import DirectorySearch

    entra = stack.sandbox.entra
    token = entra.mint_delegated_graph_token(entra.persona("admin").upn)
    known = _contoso_oids(stack)[:3]
    unknown = [f"00000000-0000-4000-8000-{n:012d}" for n in range(297)]
    # the known ids fall in the 1st, 2nd and 3rd "id in" filter of 15
    wanted = [known[0], *unknown[:15], known[1], *unknown[15:29], known[2], *unknown[29:]]
    assert len(wanted) == 300
    with httpx.Client(timeout=10) as http:
        directory = DirectorySearch(http=http, graph_base_url=stack.sandbox.graph_url)
        before = len(stack.sandbox.graph.requests)
        names = directory.names(token, wanted)
        calls = stack.sandbox.graph.requests[before:]
        assert names == {o.lower(): entra.users[o].display_name for o in known}
        assert [c for c in calls if c[0] == "POST"] == [("POST", "/v1.0/$batch", 200)]
        assert len([c for c in calls if c[1] == "/v1.0/users"]) == 20

        # Graph throttles one request of the batch: the others' names are kept.
        stack.sandbox.graph.fail_next("/v1.0/users", 429, count=1)
        partial = directory.names(token, wanted)
        assert partial == {o.lower(): names[o.lower()] for o in known[1:]}

        # 301 ids: two batches.
        before = len(stack.sandbox.graph.requests)
        directory.names(token, [*wanted, "00000000-0000-4000-8000-999999999999"])
        posts = [c for c in stack.sandbox.graph.requests[before:] if c[0] == "POST"]
        assert len(posts) == 2
