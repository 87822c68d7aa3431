"""The tenant's directory through Microsoft Graph, for the portal's approver picker.

``GET {GRAPH_BASE_URL}/v1.0/users?$search="displayName:..." OR "mail:..."`` with the header
``ConsistencyLevel: eventual`` (Graph refuses ``$search`` on directory objects without it),
``$select`` of the basic profile only and a small ``$top``. The token is the signed-in admin's
delegated ``User.ReadBasic.All`` token: the search sees exactly what that person may see.
Display names go to the admin's browser and nowhere else: not logged, not stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connector_core.errors import GraphError
from connector_core.logs import get_logger, log_event

if TYPE_CHECKING:
    import httpx

__all__ = ["DirectorySearch", "DirectoryUser", "search_expression"]

MAX_RESULTS = 8
MAX_IDS_PER_FILTER = 15  # Graph's limit on the values of an "in" filter
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
        """Display names of users by object id (``$filter=id in (...)``, 15 per request), for
        showing in the reports page at request time; never stored. Unknown ids are left out;
        a refused or failed lookup raises ``GraphError`` (the page then shows the ids)."""
        import httpx

        wanted = [o for o in dict.fromkeys(object_ids) if re.fullmatch(r"[0-9a-fA-F-]{36}", o)]
        found: dict[str, str] = {}
        for start in range(0, len(wanted), MAX_IDS_PER_FILTER):
            chunk = wanted[start : start + MAX_IDS_PER_FILTER]
            values = ",".join(f"'{o}'" for o in chunk)
            try:
                response = self._http.get(
                    f"{self._base}/v1.0/users",
                    params={"$filter": f"id in ({values})", "$select": "id,displayName"},
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
            try:
                items = response.json().get("value")
            except (ValueError, AttributeError):
                items = None
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict):
                    oid, name = item.get("id"), item.get("displayName")
                    if isinstance(oid, str) and isinstance(name, str) and name:
                        found[oid.lower()] = name
        return found
