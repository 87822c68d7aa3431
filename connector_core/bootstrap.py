"""Composition root: builds every adapter once per worker process from settings.

Functions call ``get_container()`` on each invocation; the first call builds it. Tests build the
same container with fakes (``Container.in_memory``) or real local services and install it with
``set_container``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from connector_core.crypto import Keyring, SigningKeys
from connector_core.domain.models import utcnow
from connector_core.ports import EntityStore, MessageQueue
from connector_core.repositories import (
    ConfigRepository,
    MappingRepository,
    NonceRepository,
    ReportRepository,
    SubscriptionRepository,
    VisitRepository,
    WritebackRepository,
)
from connector_core.settings import Settings

if TYPE_CHECKING:
    import httpx

    from connector_core.adapters.ehr_http import EhrTargetPolicy
    from connector_core.adapters.ehr_writeback import EhrWriter
    from connector_core.adapters.entra_signin import EntraSignIn, MsalApps
    from connector_core.adapters.entra_tokens import PortalTokenValidator
    from connector_core.adapters.fhir_probe import FhirProbe
    from connector_core.adapters.graph import GraphClient
    from connector_core.adapters.notification_crypto import NotificationDecryptor
    from connector_core.adapters.smart import SmartClient
    from connector_core.service.launch import LaunchCache
    from connector_core.service.presence import PresenceRuntime

__all__ = ["Container", "get_container", "reset_container", "set_container"]

VERSION = "0.1.0"


@dataclass
class Container:
    settings: Settings
    store: EntityStore
    queue: MessageQueue
    health_store: EntityStore
    clock: Callable[[], datetime] = utcnow
    configs: ConfigRepository = field(init=False)
    mappings: MappingRepository = field(init=False)
    visits: VisitRepository = field(init=False)
    nonces: NonceRepository = field(init=False)
    subscriptions: SubscriptionRepository = field(init=False)
    reports: ReportRepository = field(init=False)

    def __post_init__(self) -> None:
        region = self.settings.region
        self.configs = ConfigRepository(self.store, region=region)
        self.mappings = MappingRepository(self.store, region=region)
        self.visits = VisitRepository(self.store, region=region)
        self.nonces = NonceRepository(self.store, region=region)
        self.subscriptions = SubscriptionRepository(self.store, region=region)
        self.reports = ReportRepository(self.store, region=region)

    @cached_property
    def http(self) -> httpx.Client:
        """One outbound HTTP client per process: explicit timeouts, no redirects followed,
        trust_env kept so SSL_CERT_FILE / REQUESTS_CA_BUNDLE reach it."""
        import httpx

        return httpx.Client(
            timeout=httpx.Timeout(10.0, connect=3.0),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            headers={"User-Agent": f"ehr-virtual-visit-connector/{VERSION}"},
        )

    @cached_property
    def ehr_policy(self) -> EhrTargetPolicy:
        from connector_core.adapters.ehr_http import EhrTargetPolicy, parse_private_targets

        return EhrTargetPolicy(
            dev_mode=self.settings.dev_mode,
            private_targets=parse_private_targets(self.settings.ehr_private_targets),
        )

    @cached_property
    def ehr_http(self) -> httpx.Client:
        """The guarded client for every EHR call (connector_core.adapters.ehr_http)."""
        from connector_core.adapters.ehr_http import guarded_client

        return guarded_client(self.ehr_policy)

    @cached_property
    def keyring(self) -> Keyring:
        """CONNECTOR_SECRET_KEY's keys; identifiers keyed by the stored identifier key."""
        from connector_core.identifier_key import IdentifierKeyStore

        identifier_key = IdentifierKeyStore(self.store, region=self.settings.region)
        return Keyring(self.settings.secret_keys, identifier_root=identifier_key.load)

    @cached_property
    def signing_keys(self) -> SigningKeys:
        return SigningKeys.from_pem_bundle(self.settings.smart_private_key.get_secret_value())

    # --- launch: SMART, Entra sign-in, Graph (adapters built once per process) ---------------
    @cached_property
    def smart(self) -> SmartClient:
        from connector_core.adapters.smart import SmartClient

        return SmartClient(
            http=self.ehr_http, signing_keys=self.signing_keys, policy=self.ehr_policy
        )

    @cached_property
    def msal_apps(self) -> MsalApps:
        from connector_core.adapters.entra_signin import MsalApps

        return MsalApps(self.settings)

    @cached_property
    def entra_signin(self) -> EntraSignIn:
        from connector_core.adapters.entra_signin import EntraSignIn

        return EntraSignIn(self.settings, apps=self.msal_apps)

    @cached_property
    def graph(self) -> GraphClient:
        from connector_core.adapters.graph import GraphClient

        return GraphClient(http=self.http, settings=self.settings, apps=self.msal_apps)

    @cached_property
    def launch_cache(self) -> LaunchCache:
        from connector_core.service.launch import LaunchCache

        return LaunchCache(self.configs, self.mappings)

    # --- portal: Entra access tokens, FHIR base URL checks ---------------------------------
    @cached_property
    def portal_tokens(self) -> PortalTokenValidator:
        from connector_core.adapters.entra_tokens import PortalTokenValidator

        return PortalTokenValidator(
            http=self.http,
            authority_host=self.settings.entra_authority_host,
            audiences=(self.settings.api_audience, self.settings.entra_client_id),
        )

    @cached_property
    def fhir_probe(self) -> FhirProbe:
        from connector_core.adapters.fhir_probe import FhirProbe

        return FhirProbe(
            dev_mode=self.settings.dev_mode, private_targets=self.ehr_policy.private_targets
        )

    # --- presence: notification decryption, write-back ledger and writer ---------------------
    @cached_property
    def notification_crypto(self) -> NotificationDecryptor:
        from connector_core.adapters.notification_crypto import NotificationDecryptor

        return NotificationDecryptor(self.settings.graph_notification_cert.get_secret_value())

    @cached_property
    def writebacks(self) -> WritebackRepository:
        return WritebackRepository(self.store, region=self.settings.region)

    @cached_property
    def ehr_writer(self) -> EhrWriter:
        from connector_core.adapters.ehr_writeback import EhrWriter

        return EhrWriter(http=self.ehr_http, tokens=self.smart)

    @cached_property
    def presence(self) -> PresenceRuntime:
        from connector_core.service.presence import PresenceRuntime

        return PresenceRuntime()

    @property
    def version(self) -> str:
        return VERSION

    @classmethod
    def from_settings(cls, settings: Settings) -> Container:
        quiet_third_party_loggers()
        from connector_core.adapters.azure_storage import (
            AzureMessageQueue,
            AzureTableStore,
            RetryOptions,
        )

        return cls(
            settings=settings,
            store=AzureTableStore(settings.storage),
            queue=AzureMessageQueue(settings.storage),
            # Health answers fast: no retries, short timeouts.
            health_store=AzureTableStore(
                settings.storage,
                retry=RetryOptions(retry_total=0, connection_timeout=2, read_timeout=2),
            ),
        )

    @classmethod
    def in_memory(cls, settings: Settings) -> Container:
        from connector_core.adapters.memory import InMemoryEntityStore, InMemoryMessageQueue

        store = InMemoryEntityStore()
        return cls(settings=settings, store=store, queue=InMemoryMessageQueue(), health_store=store)


# Libraries that log full request URLs (FHIR paths carry EHR ids) or identity details at INFO.
_CHATTY_LOGGERS = ("httpx", "httpcore", "msal", "azure.core.pipeline.policies.http_logging_policy")


def quiet_third_party_loggers() -> None:
    """Log keys, not people: keep URL-logging libraries at WARNING, and scrub OAuth values and
    tokens from every record (connector_core.logs.install_redaction)."""
    from connector_core.logs import install_redaction

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    install_redaction()


_container: Container | None = None
_lock = threading.Lock()


def get_container(environ: Mapping[str, str] | None = None) -> Container:
    """The process-wide container, built on first use (raises ``SettingsError`` if invalid)."""
    global _container
    if _container is None:
        with _lock:
            if _container is None:
                _container = Container.from_settings(Settings.from_environ(environ))
    return _container


def set_container(container: Container | None) -> None:
    global _container
    with _lock:
        _container = container


def reset_container() -> None:
    set_container(None)
