"""Settings from the environment (Function App settings / ``local.settings.json`` ``Values``).

Names are a contract (docs/design.md section 4). ``Settings.from_environ`` validates everything at
start-up and raises ``SettingsError`` naming the first bad setting.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from connector_core.domain.models import Region
from connector_core.errors import SettingsError

__all__ = ["Settings", "StorageSettings", "running_in_azure"]

# Microsoft cloud login hosts msal knows; any other authority host disables instance discovery.
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.microsoftonline.de",
        "login.windows.net",
        "login.partner.microsoftonline.cn",
    }
)
# Present on every Azure App Service / Functions instance, never on a developer machine.
_AZURE_MARKERS = ("WEBSITE_INSTANCE_ID", "WEBSITE_SITE_NAME", "CONTAINER_APP_NAME")


def running_in_azure(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name) for name in _AZURE_MARKERS)


class StorageSettings(BaseModel):
    """Either a connection string (Azurite, locally) or identity-based service URIs (Azure)."""

    model_config = ConfigDict(frozen=True)

    connection_string: SecretStr | None = None
    table_service_uri: str | None = None
    queue_service_uri: str | None = None
    client_id: str | None = Field(default=None, description="user-assigned managed identity")


def _is_loopback_or_private(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private or addr.is_link_local


class Settings(BaseModel):
    """Validated settings. Build with ``Settings.from_environ(os.environ)``."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    region: Region = Field(validation_alias="CONNECTOR_REGION")
    public_url: str = Field(validation_alias="CONNECTOR_PUBLIC_URL")
    storage: StorageSettings
    secret_key: SecretStr = Field(validation_alias="CONNECTOR_SECRET_KEY")
    dev_mode: bool = Field(default=False, validation_alias="CONNECTOR_DEV_MODE")
    portal_url: str | None = Field(default=None, validation_alias="CONNECTOR_PORTAL_URL")
    entra_authority_host: str = Field(
        default="https://login.microsoftonline.com", validation_alias="ENTRA_AUTHORITY_HOST"
    )
    entra_client_id: str = Field(validation_alias="ENTRA_CLIENT_ID")
    entra_client_secret: SecretStr | None = Field(
        default=None, validation_alias="ENTRA_CLIENT_SECRET"
    )
    entra_client_certificate: SecretStr | None = Field(
        default=None, validation_alias="ENTRA_CLIENT_CERTIFICATE"
    )
    entra_api_audience: str | None = Field(default=None, validation_alias="ENTRA_API_AUDIENCE")
    graph_base_url: str = Field(
        default="https://graph.microsoft.com", validation_alias="GRAPH_BASE_URL"
    )
    smart_client_id: str = Field(validation_alias="SMART_CLIENT_ID")
    smart_private_key: SecretStr = Field(validation_alias="SMART_PRIVATE_KEY")
    graph_notification_cert: SecretStr = Field(validation_alias="GRAPH_NOTIFICATION_CERT")
    allowed_tenants: frozenset[str] = Field(
        default=frozenset(), validation_alias="CONNECTOR_ALLOWED_TENANTS"
    )
    ehr_private_targets: str = Field(default="", validation_alias="CONNECTOR_EHR_PRIVATE_TARGETS")
    retention_days: int = Field(
        default=7, ge=1, le=3650, validation_alias="CONNECTOR_RETENTION_DAYS"
    )
    # EHR user -> Entra mappings unused this long are deleted (the clinician signs in again).
    mapping_retention_days: int = Field(
        default=365, ge=1, le=3650, validation_alias="CONNECTOR_MAPPING_RETENTION_DAYS"
    )
    # Visit summaries (reports) are kept this long, by their report day.
    report_retention_days: int = Field(
        default=400, ge=1, le=3650, validation_alias="CONNECTOR_REPORT_RETENTION_DAYS"
    )

    @field_validator("allowed_tenants", mode="before")
    @classmethod
    def _tenant_list(cls, value: Any) -> frozenset[str]:
        if isinstance(value, str):
            items = [v.strip().lower() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple | set | frozenset):
            items = [str(v).strip().lower() for v in value if str(v).strip()]
        else:
            raise ValueError("must be comma-separated Entra tenant ids")
        for item in items:
            try:
                uuid.UUID(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an Entra tenant id (a GUID)") from None
        return frozenset(items)

    @field_validator("ehr_private_targets")
    @classmethod
    def _private_targets(cls, value: str) -> str:
        from connector_core.adapters.ehr_http import parse_private_targets

        try:
            parse_private_targets(value)
        except SettingsError as error:
            raise ValueError(error.detail.split(": ", 1)[-1]) from None
        return value

    def tenant_may_onboard(self, tenant_id: str) -> bool:
        """``CONNECTOR_ALLOWED_TENANTS``: empty means any tenant (a multi-tenant service)."""
        return not self.allowed_tenants or tenant_id.lower() in self.allowed_tenants

    @field_validator("public_url", "entra_authority_host", "graph_base_url", "portal_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("secret_key")
    @classmethod
    def _key_material(cls, value: SecretStr) -> SecretStr:
        _decode_secret_keys(value.get_secret_value())
        return value

    @field_validator("smart_private_key")
    @classmethod
    def _private_key_pem(cls, value: SecretStr) -> SecretStr:
        if "PRIVATE KEY-----" not in value.get_secret_value():
            raise ValueError("must be a PEM private key (-----BEGIN PRIVATE KEY-----)")
        return value

    @field_validator("graph_notification_cert")
    @classmethod
    def _cert_pem(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if "BEGIN CERTIFICATE-----" not in text or "PRIVATE KEY-----" not in text:
            raise ValueError("must be a PEM certificate followed by its PEM private key")
        return value

    # --- derived values -------------------------------------------------------------------
    @property
    def api_base_url(self) -> str:
        return f"{self.public_url}/api"

    @property
    def api_audience(self) -> str:
        return self.entra_api_audience or f"api://{self.entra_client_id}"

    @property
    def entra_instance_discovery(self) -> bool:
        """msal must not ask Microsoft to validate an authority host it does not know."""
        return (urlsplit(self.entra_authority_host).hostname or "") in MICROSOFT_AUTHORITY_HOSTS

    @property
    def secret_keys(self) -> tuple[bytes, ...]:
        """The keys of ``CONNECTOR_SECRET_KEY``, newest (the sealing key) first."""
        return _decode_secret_keys(self.secret_key.get_secret_value())

    @property
    def secret_key_bytes(self) -> bytes:
        """The first (sealing) key."""
        return self.secret_keys[0]

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {k: v for k, v in env.items() if v != ""}
        values["storage"] = StorageSettings()  # validated below, after the simple settings
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = _setting_name(first["loc"])
            raise SettingsError(name, _friendly(first)) from None
        settings = settings.model_copy(update={"storage": _storage_from_environ(env)})
        if settings.dev_mode and running_in_azure(env):
            raise SettingsError(
                "CONNECTOR_DEV_MODE", "dev mode is refused when running in Azure; remove it"
            )
        if settings.entra_client_secret is None and settings.entra_client_certificate is None:
            raise SettingsError(
                "ENTRA_CLIENT_SECRET",
                "missing: set ENTRA_CLIENT_SECRET or ENTRA_CLIENT_CERTIFICATE",
            )
        if not settings.dev_mode and urlsplit(settings.public_url).scheme != "https":
            host = urlsplit(settings.public_url).hostname or ""
            if not _is_loopback_or_private(host):
                raise SettingsError("CONNECTOR_PUBLIC_URL", "must be https outside dev mode")
        return settings


def _decode_secret_keys(value: str) -> tuple[bytes, ...]:
    """``CONNECTOR_SECRET_KEY``: base64 keys separated by commas, newest first (docs/design.md
    section 4). Blanks around keys are ignored; each key holds at least 32 bytes."""
    from connector_core.crypto import MAX_SECRET_KEYS

    entries = [entry.strip() for entry in value.split(",")]
    if entries and not entries[-1] and len(entries) > 1:
        entries.pop()  # one trailing comma
    if not entries or not entries[0]:
        raise ValueError("must hold at least one base64 key")
    if len(entries) > MAX_SECRET_KEYS:
        raise ValueError(f"holds more than {MAX_SECRET_KEYS} keys")
    keys: list[bytes] = []
    for position, entry in enumerate(entries, start=1):
        which = "" if len(entries) == 1 else f"key {position}: "
        if not entry:
            raise ValueError(f"{which}is empty (two commas in a row?)")
        try:
            raw = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{which}must be base64 (keys are separated by commas)") from None
        if len(raw) < 32:
            raise ValueError(f"{which}must hold at least 32 bytes (256 bits) of key material")
        if raw in keys:
            raise ValueError(f"key {position} repeats key {keys.index(raw) + 1}")
        keys.append(raw)
    return tuple(keys)


def _storage_from_environ(env: Mapping[str, str]) -> StorageSettings:
    conn = env.get("CONNECTOR_STORAGE") or None
    table_uri = env.get("CONNECTOR_STORAGE__tableServiceUri") or None
    queue_uri = env.get("CONNECTOR_STORAGE__queueServiceUri") or None
    if conn is None and table_uri is None:
        raise SettingsError(
            "CONNECTOR_STORAGE",
            "missing: set a connection string, or CONNECTOR_STORAGE__tableServiceUri and "
            "CONNECTOR_STORAGE__queueServiceUri for identity-based access",
        )
    if conn is None and queue_uri is None:
        raise SettingsError(
            "CONNECTOR_STORAGE__queueServiceUri", "missing (identity-based storage)"
        )
    for name, uri in (
        ("CONNECTOR_STORAGE__tableServiceUri", table_uri),
        ("CONNECTOR_STORAGE__queueServiceUri", queue_uri),
    ):
        if uri is not None and urlsplit(uri).scheme not in ("https", "http"):
            raise SettingsError(name, "must be the service's https URI")
    if conn is not None and "=" not in conn:
        raise SettingsError("CONNECTOR_STORAGE", "is not a storage connection string")
    return StorageSettings(
        connection_string=SecretStr(conn) if conn else None,
        table_service_uri=table_uri,
        queue_service_uri=queue_uri,
        client_id=env.get("CONNECTOR_STORAGE__clientId") or None,
    )


def _setting_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    return field


def _friendly(error: Mapping[str, Any]) -> str:
    if error["type"] == "missing":
        return "missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "enum":
        return f"{message} (got {error.get('input')!r})"
    return message
