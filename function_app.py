"""The Function App: builds ``func.FunctionApp`` and registers one Blueprint per area. No logic."""

import gc

import azure.functions as func

from functions import (
    device_test,
    health,
    launch,
    portal,
    portal_web,
    presence,
    reports,
    retention,
    visits,
    wellknown,
)

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

for blueprint in (
    health.bp,
    wellknown.bp,
    portal.bp,
    portal_web.bp,
    launch.bp,
    presence.bp,
    visits.bp,
    reports.bp,
    retention.bp,
    device_test.bp,
):
    app.register_functions(blueprint)

# What indexing loaded lives as long as the worker: frozen, the collector's full passes skip it
# instead of rescanning it all (tens of ms, in the middle of a request, now and then).
gc.freeze()
