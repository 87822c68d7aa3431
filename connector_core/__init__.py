"""connector_core: the EHR virtual-visit connector's domain, use cases, ports and adapters.

Never imports ``azure.functions``. Public surface below; everything else is private. The names
load on first use (PEP 562), so importing a light module such as ``connector_core.errors``
does not build the composition root and its models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector_core.bootstrap import Container, get_container, reset_container, set_container
    from connector_core.settings import Settings

__all__ = [
    "Container",
    "Settings",
    "__version__",
    "get_container",
    "reset_container",
    "set_container",
]

_FROM_BOOTSTRAP = frozenset({"Container", "get_container", "reset_container", "set_container"})


def __getattr__(name: str) -> Any:
    if name in _FROM_BOOTSTRAP or name == "__version__":
        from connector_core import bootstrap

        return bootstrap.VERSION if name == "__version__" else getattr(bootstrap, name)
    if name == "Settings":
        from connector_core.settings import Settings

        return Settings
    raise AttributeError(f"module 'connector_core' has no attribute {name!r}")
