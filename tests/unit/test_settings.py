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


TENANT_1 = "3f8d2a6b-5c1e-4b7a-9e2d-7a41c0b8e915"
TENANT_2 = "85045508-f5bd-405e-a553-52700f86e29c"


def test_allowed_tenants_are_read_as_lower_case_guids() -> None:
    settings = Settings.from_environ(
        make_environ(CONNECTOR_ALLOWED_TENANTS=f" {TENANT_1.upper()} ,{TENANT_2},, ")
    )
    assert settings.allowed_tenants == frozenset({TENANT_1, TENANT_2})
    assert settings.tenant_may_onboard(TENANT_1)
    assert settings.tenant_may_onboard(TENANT_2.upper())
    assert not settings.tenant_may_onboard("22222222-2222-4222-8222-222222222222")


def test_no_allowed_tenants_means_any_tenant() -> None:
    for value in (None, "", " , "):
        settings = Settings.from_environ(make_environ(CONNECTOR_ALLOWED_TENANTS=value))
        assert settings.allowed_tenants == frozenset()
        assert settings.tenant_may_onboard(TENANT_1)


@pytest.mark.parametrize(
    "value", [f"{TENANT_1},contoso.onmicrosoft.com", "not-a-guid", f"{TENANT_1};{TENANT_2}"]
)
def test_allowed_tenants_must_be_guids(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(make_environ(CONNECTOR_ALLOWED_TENANTS=value))
    assert caught.value.setting == "CONNECTOR_ALLOWED_TENANTS"
    assert "CONNECTOR_ALLOWED_TENANTS" in str(caught.value)


def test_ehr_private_targets_are_checked_at_startup() -> None:
    settings = Settings.from_environ(
        make_environ(CONNECTOR_EHR_PRIVATE_TARGETS="10.0.0.5:8443,[fd00::1]:443")
    )
    assert settings.ehr_private_targets == "10.0.0.5:8443,[fd00::1]:443"


@pytest.mark.parametrize("value", ["ehr.internal:443", "10.0.0.5:99999", "[fd00::1"])
def test_bad_ehr_private_target_names_the_setting(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(make_environ(CONNECTOR_EHR_PRIVATE_TARGETS=f"10.0.0.5,{value}"))
    assert caught.value.setting == "CONNECTOR_EHR_PRIVATE_TARGETS"
    assert "CONNECTOR_EHR_PRIVATE_TARGETS" in str(caught.value)
    assert value in str(caught.value)


def test_container_builds_the_ehr_policy_from_the_settings() -> None:
    from tests.helpers import in_memory_container

    container = in_memory_container(
        CONNECTOR_DEV_MODE=None, CONNECTOR_EHR_PRIVATE_TARGETS="10.0.0.5:8443"
    )
    policy = container.ehr_policy
    assert policy.dev_mode is False
    assert policy.refusal("10.0.0.5", 8443) is None
    assert policy.refusal("10.0.0.5", 443) is not None
    assert container.smart._policy is policy  # the SMART client checks with the same policy
