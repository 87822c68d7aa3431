"""The configuration portal's web pages (docs/design.md section 5, "Configuration portal").

Thin: each route turns ``func.HttpRequest`` into a ``WebRequest``, calls its page in
``connector_core.service.portal_web.pages`` (which calls the same use cases as the JSON API)
and turns the ``WebResponse`` back. Pages, templates, Jinja2 and Babel load on the first
request, never at ``import function_app``.

GET  /api/portal                          configurations (or the sign-in page)
GET  /api/portal/signin                   -> Microsoft Entra ID; /api/portal/signin-callback back
POST /api/portal/signout
GET  /api/portal/configs/new              POST /api/portal/configs            (create)
GET  /api/portal/configs/{id}             POST /api/portal/configs/{id}       (change)
GET  /api/portal/configs/{id}/edit        GET, POST /api/portal/configs/{id}/delete
GET  /api/portal/configs/{id}/history
POST /api/portal/configs/{id}/ehr-signin  POST /api/portal/configs/{id}/approve
POST /api/portal/directory                (the approver picker's search; JSON)
GET  /api/portal/reports                  usage reports; /api/portal/reports/export (CSV)
GET  /api/portal/static/{name}            CSS and scripts
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from connector_core.logs import get_logger, use_correlation_id
from functions._http import container, request_correlation_id

if TYPE_CHECKING:
    from connector_core.service.portal_web.web import WebRequest, WebResponse

bp = func.Blueprint()
_log = get_logger("portal.web")


def _request(req: func.HttpRequest) -> WebRequest:
    from connector_core.service.portal_web.web import WebRequest, parse_cookies, parse_form

    headers = {k.lower(): v for k, v in req.headers.items()}
    form: dict[str, str] = {}
    if req.method == "POST":
        form = parse_form(req.get_body() or b"", headers.get("content-type", ""))
    path = "/" + req.url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
    return WebRequest(
        method=req.method.upper(),
        path=path,
        route={k: v for k, v in req.route_params.items() if isinstance(v, str)},
        query={k: v for k, v in req.params.items() if isinstance(v, str)},
        form=form,
        cookies=parse_cookies(headers.get("cookie", "")),
        headers=headers,
    )


def _response(result: WebResponse) -> func.HttpResponse:
    mimetype, _, params = result.content_type.partition(";")
    charset = params.partition("=")[2].strip() or None
    response = func.HttpResponse(
        result.body,
        status_code=result.status,
        mimetype=mimetype.strip(),
        charset=charset or "utf-8",
        headers=result.headers,
    )
    for cookie in result.set_cookies:
        response.headers.add("Set-Cookie", cookie)
    return response


def _serve(req: func.HttpRequest, page: str) -> func.HttpResponse:
    """Runs ``pages.<page>``; a bad request body or a crash is a friendly page (never a trace)."""
    from connector_core.errors import ConnectorError
    from connector_core.service.portal_web import pages

    with use_correlation_id(request_correlation_id(req)) as cid:
        root = container()
        try:
            result = getattr(pages, page)(root, _request(req))
        except ConnectorError as error:  # before the page could run (an oversized form)
            result = pages.failure_page(root, _bare(req), error)
        except Exception:
            _log.exception("portal.page_crashed page=%s", page)
            result = pages.failure_page(root, _bare(req), None)
        response = _response(result)
        response.headers["x-correlation-id"] = cid
        return response


def _bare(req: func.HttpRequest) -> WebRequest:
    """The request without its body (for an error page when the body itself was the error)."""
    from connector_core.service.portal_web.web import WebRequest, parse_cookies

    headers = {k.lower(): v for k, v in req.headers.items()}
    return WebRequest(
        method="GET",
        path="/api/portal",
        cookies=parse_cookies(headers.get("cookie", "")),
        headers=headers,
    )


_ANON = func.AuthLevel.ANONYMOUS


@bp.route(route="portal", methods=["GET"], auth_level=_ANON)
def portal_home(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "home")


@bp.route(route="portal/signin", methods=["GET"], auth_level=_ANON)
def portal_signin(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "signin_start")


@bp.route(route="portal/signin-callback", methods=["GET"], auth_level=_ANON)
def portal_signin_callback(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "signin_callback")


@bp.route(route="portal/signout", methods=["POST"], auth_level=_ANON)
def portal_signout(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "signout")


@bp.route(route="portal/configs/new", methods=["GET"], auth_level=_ANON)
def portal_config_new(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_new")


@bp.route(route="portal/configs", methods=["POST"], auth_level=_ANON)
def portal_config_create(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_save")


@bp.route(route="portal/configs/{id}", methods=["GET"], auth_level=_ANON)
def portal_config_page(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_detail")


@bp.route(route="portal/configs/{id}", methods=["POST"], auth_level=_ANON)
def portal_config_update(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_save")


@bp.route(route="portal/configs/{id}/edit", methods=["GET"], auth_level=_ANON)
def portal_config_edit(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_edit")


@bp.route(route="portal/configs/{id}/delete", methods=["GET", "POST"], auth_level=_ANON)
def portal_config_delete(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_delete")


@bp.route(route="portal/configs/{id}/history", methods=["GET"], auth_level=_ANON)
def portal_config_history_page(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "config_history")


@bp.route(route="portal/configs/{id}/ehr-signin", methods=["POST"], auth_level=_ANON)
def portal_config_ehr_signin(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "ehr_signin")


@bp.route(route="portal/configs/{id}/approve", methods=["POST"], auth_level=_ANON)
def portal_config_approve(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "approve")


@bp.route(route="portal/directory", methods=["POST"], auth_level=_ANON)
def portal_directory(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "directory_search")


@bp.route(route="portal/reports", methods=["GET"], auth_level=_ANON)
def portal_reports(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "reports")


@bp.route(route="portal/reports/export", methods=["GET"], auth_level=_ANON)
def portal_reports_export(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "reports_export")


@bp.route(route="portal/static/{name}", methods=["GET"], auth_level=_ANON)
def portal_static(req: func.HttpRequest) -> func.HttpResponse:
    return _serve(req, "static_asset")
