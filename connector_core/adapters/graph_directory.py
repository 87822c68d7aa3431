"""The tenant's directory through Microsoft Graph, for the portal's approver picker.

``GET {GRAPH_BASE_URL}/v1.0/users?$search="displayName:..." OR "mail:..."`` with the header
``ConsistencyLevel: eventual`` (Graph refuses ``$search`` on directory objects without it),
``$select`` of the basic profile only and a small ``$top``. The token is the signed-in admin's
delegated ``User.ReadBasic.All`` token: the search sees exactly what that person may see.
Display names go to the admin's browser and nowhere else: not logged, not stored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from connector_core.errors import GraphError
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    import httpx

__all__ = ["DirectorySearch", "DirectoryUser", "search_expression"]

MAX_RESULTS = 8
MAX_IDS_PER_FILTER = 15  # Graph's limit on the values of an "in" filter
MAX_BATCH_REQUESTS = 20  # Graph's limit on the requests of a JSON batch
QUOTE_SAFE = "(),'"  # kept readable in a batch step's $filter; spaces are encoded
MIN_QUERY = 2
MAX_QUERY = 64
_SELECT = "id,displayName,userPrincipalName,mail"
# Graph's $search clause is "property:value" in double quotes; quotes and backslashes in the
# value would end or escape it, so they (and control characters) never reach Graph.
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')
_log = get_logger("graph.directory")


@dataclass(frozen=True)
class DirectoryUser:
    object_id: str
    display_name: str
    upn: str
    mail: str | None


def search_expression(text: str) -> str | None:
    """The ``$search`` value for what the admin typed, or None when too short to search."""
    cleaned = " ".join(_UNSAFE.sub(" ", text).split())[:MAX_QUERY]
    if len(cleaned) < MIN_QUERY:
        return None
    return f'"displayName:{cleaned}" OR "mail:{cleaned}"'


class DirectorySearch:
    def __init__(self, *, http: httpx.Client, graph_base_url: str) -> None:
        self._http = http
        self._base = graph_base_url.rstrip("/")

    def search(self, token: str, text: str, *, top: int = MAX_RESULTS) -> list[DirectoryUser]:
        expression = search_expression(text)
        if expression is None:
            return []
        import httpx

        try:
            response = self._http.get(
                f"{self._base}/v1.0/users",
                params={"$search": expression, "$select": _SELECT, "$top": str(top)},
                headers={"Authorization": f"Bearer {token}", "ConsistencyLevel": "eventual"},
            )
        except httpx.HTTPError:
            raise GraphError(
                "Microsoft Graph could not be reached for the directory search.",
                reason="unreachable",
            ) from None
        if response.status_code in (401, 403):
            log_event(_log, "graph.directory_denied", status=response.status_code)
            raise GraphError(
                "The directory search is not allowed for your account (it needs the delegated "
                "Microsoft Graph permission User.ReadBasic.All, granted to the connector's app).",
                action="Type the approver's user principal name instead, and ask a Microsoft "
                "365 administrator to grant the connector's app User.ReadBasic.All.",
                reason="directory_permission",
            )
        if response.status_code != 200:
            log_event(_log, "graph.directory_failed", status=response.status_code)
            raise GraphError(
                f"Microsoft Graph answered the directory search with HTTP {response.status_code}.",
                action="Try again in a moment, or type the approver's user principal name.",
                reason="throttled" if response.status_code in (429, 503) else "failed",
            )
        try:
            items = response.json().get("value")
        except (ValueError, AttributeError):
            items = None
        if not isinstance(items, list):
            raise GraphError("Microsoft Graph answered the directory search with no list.")
        found: list[DirectoryUser] = []
        for item in items[:top]:
            if not isinstance(item, dict):
                continue
            oid, name, upn = item.get("id"), item.get("displayName"), item.get("userPrincipalName")
            if not (isinstance(oid, str) and isinstance(upn, str) and upn):
                continue
            mail = item.get("mail")
            found.append(
                DirectoryUser(
                    object_id=oid,
                    display_name=name if isinstance(name, str) and name else upn,
                    upn=upn,
                    mail=mail if isinstance(mail, str) else None,
                )
            )
        return found

    def names(self, token: str, object_ids: list[str]) -> dict[str, str]:
        """Display names of users by object id, for showing in the reports page at request
        time; never stored. ``$filter=id in (...)`` takes 15 ids, and JSON batching
        (``POST /v1.0/$batch``) carries 20 such requests, so 300 organizers cost one round trip
        (the page's 500 rows at most two). Unknown ids are left out, and so are the ids of a
        request Graph refused inside the batch (throttled, say: the page shows those ids); a
        refused or failed batch raises ``GraphError`` (the page then shows every id)."""
        import httpx

        wanted = [o for o in dict.fromkeys(object_ids) if re.fullmatch(r"[0-9a-fA-F-]{36}", o)]
        filters = [
            wanted[start : start + MAX_IDS_PER_FILTER]
            for start in range(0, len(wanted), MAX_IDS_PER_FILTER)
        ]
        found: dict[str, str] = {}
        for first in range(0, len(filters), MAX_BATCH_REQUESTS):
            steps = [
                {"id": str(n), "method": "GET", "url": _names_url(chunk)}
                for n, chunk in enumerate(filters[first : first + MAX_BATCH_REQUESTS])
            ]
            try:
                response = self._http.post(
                    f"{self._base}/v1.0/$batch",
                    json={"requests": steps},
                    headers={"Authorization": f"Bearer {token}"},
                )
            except httpx.HTTPError:
                raise GraphError(
                    "Microsoft Graph could not be reached.", reason="unreachable"
                ) from None
            if response.status_code != 200:
                log_event(_log, "graph.directory_names_failed", status=response.status_code)
                raise GraphError(
                    f"Microsoft Graph answered with HTTP {response.status_code}.", reason="failed"
                )
            refused = _collect_names(response, found)
            if refused:  # statuses only: the ids are people's
                log_event(
                    _log,
                    "graph.directory_names_partial",
                    level=logging.WARNING,
                    refused=len(refused),
                    statuses=",".join(sorted(set(refused))),
                )
        return found


def _names_url(object_ids: list[str]) -> str:
    """A batch step's relative URL: the users with these ids, their display names only."""
    values = ",".join(f"'{o}'" for o in object_ids)
    return f"/users?$filter={quote(f'id in ({values})', safe=QUOTE_SAFE)}&$select=id,displayName"


def _collect_names(response: httpx.Response, found: dict[str, str]) -> list[str]:
    """Adds the names a batch answer carries to ``found``; the statuses of refused steps."""
    try:
        answers = response.json().get("responses")
    except (ValueError, AttributeError):
        answers = None
    refused: list[str] = []
    for answer in answers if isinstance(answers, list) else []:
        if not isinstance(answer, dict):
            continue
        body = answer.get("body")
        if answer.get("status") != 200 or not isinstance(body, dict):
            refused.append(str(answer.get("status")))
            continue
        items = body.get("value")
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                oid, name = item.get("id"), item.get("displayName")
                if isinstance(oid, str) and isinstance(name, str) and name:
                    found[oid.lower()] = name
    return refused
