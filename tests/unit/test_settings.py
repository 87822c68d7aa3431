from __future__ import annotations

import pytest

from connector_core.domain.models import Region
from connector_core.errors import SettingsError
from connector_core.settings import Settings
from tests.helpers import make_environ


def test_valid_environment_builds_settings() -> None:
    settings = Settings.from_environ(make_environ(CONNECTOR_REGION="emea"))
    assert settings.region is Region.EMEA
    assert settings.api_base_url == "http://127.0.0.1:7071/api"
    assert settings.api_audience == "api://00000000-0000-4000-8000-00000000c0de"
    assert settings.entra_instance_discovery is False
    assert len(settings.secret_key_bytes) == 32


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"CONNECTOR_REGION": None}, "CONNECTOR_REGION"),
        ({"CONNECTOR_REGION": "mars"}, "CONNECTOR_REGION"),
        ({"CONNECTOR_PUBLIC_URL": "not a url"}, "CONNECTOR_PUBLIC_URL"),
        ({"CONNECTOR_SECRET_KEY": "c2hvcnQ="}, "CONNECTOR_SECRET_KEY"),
        ({"CONNECTOR_SECRET_KEY": "%%%"}, "CONNECTOR_SECRET_KEY"),
        ({"CONNECTOR_STORAGE": None}, "CONNECTOR_STORAGE"),
        ({"SMART_PRIVATE_KEY": "nope"}, "SMART_PRIVATE_KEY"),
        ({"GRAPH_NOTIFICATION_CERT": "nope"}, "GRAPH_NOTIFICATION_CERT"),
        ({"ENTRA_CLIENT_ID": None}, "ENTRA_CLIENT_ID"),
        ({"ENTRA_CLIENT_SECRET": None}, "ENTRA_CLIENT_SECRET"),
        ({"GRAPH_BASE_URL": "ftp://graph"}, "GRAPH_BASE_URL"),
        ({"SMART_CLIENT_ID": None}, "SMART_CLIENT_ID"),
    ],
)
def test_errors_name_the_bad_setting(overrides: dict[str, str | None], setting: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(make_environ(**overrides))
    assert caught.value.setting == setting
    assert setting in str(caught.value)


def test_dev_mode_is_refused_in_azure() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(make_environ(WEBSITE_INSTANCE_ID="abc123"))
    assert caught.value.setting == "CONNECTOR_DEV_MODE"


def test_identity_based_storage_needs_both_uris() -> None:
    env = make_environ(
        CONNECTOR_STORAGE=None,
        CONNECTOR_STORAGE__tableServiceUri="https://acct.table.core.windows.net",
    )
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(env)
    assert caught.value.setting == "CONNECTOR_STORAGE__queueServiceUri"
    env["CONNECTOR_STORAGE__queueServiceUri"] = "https://acct.queue.core.windows.net"
    settings = Settings.from_environ(env)
    assert settings.storage.connection_string is None
    assert settings.storage.table_service_uri == "https://acct.table.core.windows.net"


def test_public_url_must_be_https_outside_dev_mode() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(
            make_environ(CONNECTOR_DEV_MODE=None, CONNECTOR_PUBLIC_URL="http://connector.example")
        )
    assert caught.value.setting == "CONNECTOR_PUBLIC_URL"


def test_microsoft_authority_keeps_instance_discovery() -> None:
    settings = Settings.from_environ(
        make_environ(ENTRA_AUTHORITY_HOST="https://login.microsoftonline.com/")
    )
    assert settings.entra_authority_host == "https://login.microsoftonline.com"
    assert settings.entra_instance_discovery is True
