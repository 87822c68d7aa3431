"""GET /api/.well-known/jwks.json: public keys EHRs use to verify the connector's assertions."""

from __future__ import annotations

import azure.functions as func

from functions._http import api, container, json_response

bp = func.Blueprint()


@bp.route(route=".well-known/jwks.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@api
def jwks(req: func.HttpRequest) -> func.HttpResponse:
    keys = container().signing_keys.jwks()
    # EHRs cache the JWKS; a short max-age lets a key rollover reach them within minutes.
    return json_response(keys, headers={"Cache-Control": "public, max-age=300"})
