"""HTTP translation shared by all blueprints: problem+json, HTML error pages, correlation ids.

``@api`` wraps a JSON endpoint, ``@browser`` a browser (HTML/redirect) endpoint. Both map every
``ConnectorError`` to its status once, and turn anything unexpected into a 500 that shows only a
correlation id (the traceback goes to the log, never to the caller).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import azure.functions as func

from connector_core.errors import ConnectorError, PayloadTooLargeError, SettingsError
from connector_core.logs import get_logger, log_event, new_correlation_id, use_correlation_id

if TYPE_CHECKING:
    from connector_core.bootstrap import Container

__all__ = [
    "MAX_BODY_BYTES",
    "api",
    "browser",
    "browser_error_page",
    "container",
    "html_page",
    "json_response",
    "problem_response",
    "read_json_body",
    "request_cookies",
    "request_correlation_id",
]

MAX_BODY_BYTES = 64 * 1024
PROBLEM_BASE = "https://ehr-virtual-visit-connector.dev/problems/"
_CORRELATION_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
_log = get_logger("http")

Handler = Callable[[func.HttpRequest], func.HttpResponse]


def container() -> Container:
    """The composition root. Blueprints import ``connector_core`` use cases inside their
    handlers, not at module level, so ``import function_app`` (the worker's indexing step) loads
    only what registering the functions needs; each route loads what it uses on first call."""
    from connector_core.bootstrap import get_container

    return get_container()


def request_cookies(req: func.HttpRequest) -> dict[str, str]:
    """The request's cookies (the first of a name wins, as browsers send the most specific)."""
    from connector_core.service.portal_web.web import parse_cookies

    return parse_cookies(str(req.headers.get("cookie", "") or ""))


def request_correlation_id(req: func.HttpRequest) -> str:
    """The caller's ``x-correlation-id`` when well-formed, else a new one."""
    supplied = req.headers.get("x-correlation-id", "")
    return supplied if _CORRELATION_RE.match(supplied) else new_correlation_id()


_correlation_id = request_correlation_id


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":"), default=str),
        status_code=status,
        mimetype="application/json",
        charset="utf-8",
        headers=headers,
    )


def problem_response(error: ConnectorError, correlation_id: str) -> func.HttpResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + error.problem_type,
        "title": error.title,
        "status": error.http_status,
        "detail": error.detail,
        "correlationId": correlation_id,
        **{k: v for k, v in error.extra.items() if v is not None},
    }
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":"), default=str),
        status_code=error.http_status,
        mimetype="application/problem+json",
        charset="utf-8",
        headers={"x-correlation-id": correlation_id, "Cache-Control": "no-store"},
    )


def html_page(
    *, title: str, message: str, action: str, correlation_id: str, status: int
) -> func.HttpResponse:
    """The short page browsers get for errors: what happened, what to do, the correlation id."""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;
color:#222}}h1{{font-size:1.4rem}}.cid{{color:#666;font-size:.85rem}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="what">{html.escape(message)}</p>
<p class="todo">{html.escape(action)}</p>
<p class="cid">Reference (correlation id): <code>{html.escape(correlation_id)}</code></p>
</body></html>"""
    return func.HttpResponse(
        body,
        status_code=status,
        mimetype="text/html",
        charset="utf-8",
        headers={"x-correlation-id": correlation_id, "Cache-Control": "no-store"},
    )


def inline_script(name: str, nonce: str) -> str:
    """A packaged script inlined with the page's CSP nonce (no separate request, no 'self')."""
    from connector_core.service.portal_web.render import static_file

    found = static_file(name)
    source = (found[0].decode() if found else "").replace("</", "<\\/")  # cannot end the element
    return f'<script nonce="{nonce}">\n{source}\n</script>'


def page_response(
    body: str, *, locale: str, csp: str, headers: dict[str, str] | None = None
) -> func.HttpResponse:
    """A 200 page for people (the visit page, the device check): never cached, no referrer."""
    return func.HttpResponse(
        body,
        status_code=200,
        mimetype="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Language": locale,
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            **(headers or {}),
        },
    )


def read_json_body(req: func.HttpRequest) -> Any:
    """The request's JSON body; ``InvalidInputError``/``PayloadTooLargeError`` when unusable."""
    from connector_core.errors import InvalidInputError

    raw = req.get_body() or b""
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: not a 500
        raise InvalidInputError("The request body must be valid JSON.") from None


def _log_failure(error: Exception, req: func.HttpRequest) -> None:
    route = req.route_params
    if isinstance(error, ConnectorError):
        level = logging.ERROR if isinstance(error, SettingsError) else logging.INFO
        if error.http_status >= 500:
            level = logging.ERROR
        log_event(
            _log,
            "request.failed",
            level=level,
            error=type(error).__name__,
            status=error.http_status,
            method=req.method,
            route_keys=",".join(route),
        )
    else:
        _log.exception("request.crashed error=%s method=%s", type(error).__name__, req.method)


def api(handler: Handler) -> Handler:
    """Wrap a JSON endpoint: problem+json on error, correlation id on every response."""

    @functools.wraps(handler)
    def wrapper(req: func.HttpRequest) -> func.HttpResponse:
        cid = _correlation_id(req)
        with use_correlation_id(cid):
            try:
                response = handler(req)
            except ConnectorError as error:
                _log_failure(error, req)
                return problem_response(error, cid)
            except Exception as error:  # a bug: log it, show only the correlation id
                _log_failure(error, req)
                return problem_response(
                    ConnectorError("An unexpected error occurred; quote the correlation id."), cid
                )
            response.headers["x-correlation-id"] = cid
            return response

    return wrapper


def browser_error_page(
    req: func.HttpRequest, error: ConnectorError | None, correlation_id: str
) -> func.HttpResponse:
    """The friendly error page in the browser's language (English, Portuguese, Spanish); the
    plain English page if rendering it fails, so an error page never fails."""
    status = error.http_status if error is not None else 500
    headers = {"x-correlation-id": correlation_id, "Cache-Control": "no-store"}
    try:
        from connector_core.service.portal_web import public

        locale, _ = public.locale_for(req.headers, req.params)
        body = public.error_html(locale=locale, error=error, correlation_id=correlation_id)
        headers["Content-Language"] = locale
    except Exception:
        _log.exception("request.error_page_failed")
        if error is None:
            return html_page(
                title="Something went wrong",
                message="The request could not be completed because of an unexpected error.",
                action="Try again from the EHR. If it keeps happening, contact your "
                "administrator and give them the reference below.",
                correlation_id=correlation_id,
                status=500,
            )
        return html_page(
            title=error.title,
            message=error.detail,
            action=str(
                error.extra.get("action")
                or "Go back to the EHR and try again. If it keeps happening, contact your "
                "administrator and give them the reference below."
            ),
            correlation_id=correlation_id,
            status=status,
        )
    return func.HttpResponse(
        body, status_code=status, mimetype="text/html", charset="utf-8", headers=headers
    )


def browser(handler: Handler) -> Handler:
    """Wrap a browser endpoint: friendly HTML page on error, never a stack trace."""

    @functools.wraps(handler)
    def wrapper(req: func.HttpRequest) -> func.HttpResponse:
        cid = _correlation_id(req)
        with use_correlation_id(cid):
            try:
                response = handler(req)
            except ConnectorError as error:
                _log_failure(error, req)
                return browser_error_page(req, error, cid)
            except Exception as error:
                _log_failure(error, req)
                return browser_error_page(req, None, cid)
            response.headers["x-correlation-id"] = cid
            return response

    return wrapper
