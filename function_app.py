"""The Function App: builds ``func.FunctionApp`` and registers one Blueprint per area. No logic."""

import azure.functions as func

from functions import health, launch, portal, portal_web, presence, visits, wellknown

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

for blueprint in (
    health.bp,
    wellknown.bp,
    portal.bp,
    portal_web.bp,
    launch.bp,
    presence.bp,
    visits.bp,
):
    app.register_functions(blueprint)
