"""Storage queue names (the Functions triggers bind to them by name, so they are a contract
between ``functions/`` and the use cases; kept here, apart from the use cases, so registering
the triggers imports nothing else)."""

from __future__ import annotations

__all__ = [
    "PRESENCE_POISON_QUEUE",
    "PRESENCE_QUEUE",
    "SUBSCRIPTION_POISON_QUEUE",
    "SUBSCRIPTION_QUEUE",
]

# Call events the webhook accepted, for the presence worker (state + EHR write-back).
PRESENCE_QUEUE = "presence-events"
PRESENCE_POISON_QUEUE = f"{PRESENCE_QUEUE}-poison"  # the Functions host's naming convention
# New meetings whose Graph call-event subscription the worker creates (off the launch path).
SUBSCRIPTION_QUEUE = "meeting-subscriptions"
SUBSCRIPTION_POISON_QUEUE = f"{SUBSCRIPTION_QUEUE}-poison"
