"""The patient's device check: ``GET /api/device-test/{configId}`` (the ``device-test``
integration record; docs/visit-page.md).

A page where a patient checks camera, microphone and speaker in the browser before the visit.
No SMART launch, no sign-in, no patient data: the config id only says which health system's
link it is (an unknown or unapproved one gets the friendly error page). Its CSP allows no
connection at all (``connect-src 'none'``), so nothing the page sees or hears can leave the
device, and ``Permissions-Policy`` lets only this page use camera and microphone.
"""

from __future__ import annotations

import secrets

import azure.functions as func

from functions._http import browser, container, inline_script, page_response

bp = func.Blueprint()

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; media-src 'self' blob:; "
    "connect-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors *; "
    "script-src 'nonce-{nonce}'"
)


@bp.route(route="device-test/{configId}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@browser
def device_test(req: func.HttpRequest) -> func.HttpResponse:
    from connector_core.logs import correlation_id
    from connector_core.service.portal_web import public
    from connector_core.service.portal_web.visit_pages import device_test_html

    config_id = req.route_params.get("configId", "")
    container().launch_cache.config(config_id)  # cached; NotFound / not approved: error page
    locale, _ = public.locale_for(req.headers, req.params)
    nonce = secrets.token_urlsafe(18)
    page = device_test_html(
        locale=locale,
        script=inline_script("device_test.js", nonce),
        correlation_id=correlation_id(),
        page_url=f"/api/device-test/{config_id}",
    )
    return page_response(
        page,
        locale=locale,
        csp=_CSP.format(nonce=nonce),
        headers={"Permissions-Policy": "camera=(self), microphone=(self), geolocation=()"},
    )
