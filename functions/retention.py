"""Retention: the hourly purge of expired visits, nonces, sessions, subscriptions and mappings
(``connector_core.service.retention``). Safe on several instances at once."""

from __future__ import annotations

import azure.functions as func

from connector_core.logs import new_correlation_id, use_correlation_id
from functions._http import container

bp = func.Blueprint()

# Minute 17 of every hour: off the hour, when other timers and reports tend to run.
SCHEDULE = "0 17 * * * *"


@bp.timer_trigger(schedule=SCHEDULE, arg_name="timer", run_on_startup=False)
def retention_purge(timer: func.TimerRequest) -> None:
    with use_correlation_id(new_correlation_id()):
        from connector_core.service.retention import purge_expired

        purge_expired(container())
