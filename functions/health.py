"""GET /api/health: region, version; 503 when storage is unreachable."""

from __future__ import annotations

import azure.functions as func

from functions._http import api, container, json_response

bp = func.Blueprint()


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@api
def health(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service.health import check_health

    return json_response(check_health(container()), headers={"Cache-Control": "no-store"})
