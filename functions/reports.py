"""Usage reports API (docs/design.md section 5, "Reports"): ``GET /api/reports/visits`` as JSON
or RFC 4180 CSV, for ``Connector.Admin`` and ``Connector.Auditor`` of the caller's tenant.

The CSV is encoded chunk by chunk from paged storage queries (``service.reports.csv_chunks``);
the Functions Python worker takes a response body whole, so the chunks are joined here: the
encoded text is held once, never a list of visit objects.
"""

from __future__ import annotations

import azure.functions as func

from functions._http import container, json_response
from functions.portal import _caller, _portal

bp = func.Blueprint()

_NO_STORE = {"Cache-Control": "no-store"}


def _wants_csv(req: func.HttpRequest) -> bool:
    from connector_core.errors import InvalidInputError

    fmt = (req.params.get("format") or "").strip().lower()
    if fmt not in ("", "json", "csv"):
        raise InvalidInputError("'format' is json or csv.", parameter="format")
    if fmt:
        return fmt == "csv"
    accept = req.headers.get("accept") or ""
    return "text/csv" in accept.lower() and "application/json" not in accept.lower()


@bp.route(route="reports/visits", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@_portal
def report_visits(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import reports as service

    root = container()
    caller = _caller(req)
    service.authorize(caller)
    query = service.parse_query(req.params)
    if _wants_csv(req):
        body = b"".join(service.csv_chunks(root, caller, query))
        name = service.csv_filename(query)
        return func.HttpResponse(
            body,
            status_code=200,
            mimetype="text/csv",
            charset="utf-8",
            headers={
                **_NO_STORE,
                "Content-Disposition": f'attachment; filename="{name}"',
                "Vary": "Accept",
            },
        )
    return json_response(
        service.report_json(root, caller, query), headers={**_NO_STORE, "Vary": "Accept"}
    )
