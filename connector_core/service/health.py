"""Health: is this deployment able to serve (storage reachable)?"""

from __future__ import annotations

from typing import Any

from connector_core.bootstrap import Container

__all__ = ["check_health"]


def check_health(container: Container) -> dict[str, Any]:
    """``StorageUnavailableError`` when storage cannot be reached."""
    container.health_store.ping()
    return {
        "status": "ok",
        "region": container.settings.region.value,
        "version": container.version,
    }
