"""Test helpers: valid settings environments and containers over fakes or Azurite."""

from __future__ import annotations

import functools
from typing import Any

from connector_core.bootstrap import Container
from connector_core.settings import Settings
from devtools.dev_secrets import dev_secret_settings


@functools.cache
def _secrets() -> dict[str, str]:
    return dev_secret_settings()


def make_environ(**overrides: Any) -> dict[str, str]:
    env = {
        "CONNECTOR_REGION": "americas",
        "CONNECTOR_PUBLIC_URL": "http://127.0.0.1:7071",
        "CONNECTOR_STORAGE": "UseDevelopmentStorage=true",
        "CONNECTOR_DEV_MODE": "1",
        "ENTRA_AUTHORITY_HOST": "https://127.0.0.1:7443",
        "ENTRA_CLIENT_ID": "00000000-0000-4000-8000-00000000c0de",
        "ENTRA_CLIENT_SECRET": "test-secret",
        "GRAPH_BASE_URL": "http://127.0.0.1:7480",
        "SMART_CLIENT_ID": "vv-connector-test",
        **_secrets(),
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def make_settings(**overrides: Any) -> Settings:
    return Settings.from_environ(make_environ(**overrides))


def in_memory_container(**overrides: Any) -> Container:
    return Container.in_memory(make_settings(**overrides))
