"""Configuration portal API (docs/design.md section 5): thin HTTP translation over
``connector_core._configs().configs``. JSON routes answer problem+json errors; the EHR sign-in
callback is a browser route (HTML error pages)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import azure.functions as func

from connector_core.logs import correlation_id
from functions._http import (
    Handler,
    api,
    browser,
    container,
    json_response,
    read_json_body,
)

if TYPE_CHECKING:
    from connector_core.domain.models import TenantConfig, Versioned
    from connector_core.service.portal_models import Caller, ConfigInput

bp = func.Blueprint()

_NO_STORE = {"Cache-Control": "no-store"}


def _portal(handler: Handler) -> Handler:
    """``@api`` plus the Bearer challenge on 401 (RFC 6750)."""
    wrapped = api(handler)

    @functools.wraps(handler)
    def inner(req: func.HttpRequest) -> func.HttpResponse:
        response = wrapped(req)
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return response

    return inner


def _caller(req: func.HttpRequest) -> Caller:
    from connector_core.service import configs as service

    return service.authenticate(container(), req.headers.get("authorization"))


def _config_response(
    versioned: Versioned[TenantConfig], *, status: int = 200, location: bool = False
) -> func.HttpResponse:
    from connector_core.service import configs as service

    root = container()
    headers = {**_NO_STORE, "ETag": service.http_etag(versioned)}
    if location:
        headers["Location"] = f"{root.settings.api_base_url}/configs/{versioned.record.id}"
    body = service.config_view(root, versioned.record).to_json()
    return json_response(body, status=status, headers=headers)


def _body(req: func.HttpRequest) -> ConfigInput:
    from connector_core.service.portal_models import ConfigInput, parse_body

    return parse_body(ConfigInput, read_json_body(req))


@bp.route(route="configs", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
@_portal
def portal_configs(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import configs as service

    root = container()
    caller = _caller(req)
    if req.method == "POST":
        created = service.create_config(root, caller, _body(req))
        return _config_response(created, status=201, location=True)
    items = service.list_configs(root, caller)
    body = [service.config_view(root, v.record).to_json() for v in items]
    return json_response(body, headers=_NO_STORE)


@bp.route(
    route="configs/{id}", methods=["GET", "PUT", "DELETE"], auth_level=func.AuthLevel.ANONYMOUS
)
@_portal
def portal_config(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import configs as service

    root = container()
    caller = _caller(req)
    config_id = req.route_params.get("id", "")
    if req.method == "PUT":
        updated = service.update_config(
            root, caller, config_id, _body(req), if_match=req.headers.get("if-match")
        )
        return _config_response(updated)
    if req.method == "DELETE":
        service.delete_config(root, caller, config_id, if_match=req.headers.get("if-match"))
        return func.HttpResponse(status_code=204, headers=_NO_STORE)
    return _config_response(service.get_config(root, caller, config_id))


@bp.route(route="configs/{id}/history", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@_portal
def portal_config_history(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import configs as service

    root = container()
    changes = service.config_history(root, _caller(req), req.route_params.get("id", ""))
    body = [c.model_dump(mode="json", by_alias=True) for c in changes]
    return json_response(body, headers=_NO_STORE)


@bp.route(route="configs/{id}/ehr-signin", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@_portal
def portal_ehr_signin(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import configs as service

    root = container()
    started = service.start_ehr_signin(root, _caller(req), req.route_params.get("id", ""))
    return json_response(started.model_dump(mode="json", by_alias=True), headers=_NO_STORE)


@bp.route(route="configs/{id}/approve", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@_portal
def portal_approve(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import configs as service

    root = container()
    approved = service.approve_config(
        root,
        _caller(req),
        req.route_params.get("id", ""),
        if_match=req.headers.get("if-match"),
    )
    return _config_response(approved)


@bp.route(route="ehr-signin/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@browser
def portal_ehr_signin_callback(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service import configs as service

    done = service.complete_ehr_signin(
        container(),
        state=req.params.get("state"),
        code=req.params.get("code"),
        error=req.params.get("error"),
        iss=req.params.get("iss"),
    )
    if done.redirect_url:
        return func.HttpResponse(
            status_code=302, headers={"Location": done.redirect_url, **_NO_STORE}
        )
    from connector_core.service.portal_web import public

    locale, _ = public.locale_for(req.headers, req.params)
    return func.HttpResponse(
        public.signin_done_html(locale=locale, correlation_id=correlation_id()),
        status_code=200,
        mimetype="text/html",
        charset="utf-8",
        headers={**_NO_STORE, "Content-Language": locale},
    )


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@api
def portal_openapi(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.service.portal_openapi import openapi_document

    document = openapi_document(container().settings.api_base_url)
    return json_response(document, headers={"Cache-Control": "public, max-age=300"})
