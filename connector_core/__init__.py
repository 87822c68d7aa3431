"""connector_core: the EHR virtual-visit connector's domain, use cases, ports and adapters.

Never imports ``azure.functions``. Public surface below; everything else is private.
"""

from connector_core.bootstrap import VERSION as __version__
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
