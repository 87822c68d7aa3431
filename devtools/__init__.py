"""Development-only tools: the local Functions host, Azurite control and the sandbox.

Nothing here is imported by ``function_app`` or ``connector_core``.
"""
