"""The connector's named exceptions, each mapped once to an HTTP status.

Hierarchy (``http_status`` in brackets)::

    ConnectorError                      base of everything the connector raises on purpose [500]
    ├── SettingsError                   a setting is missing or invalid; names the setting [500]
    ├── InvalidInputError               a caller's input is malformed or fails validation [400]
    │   └── PayloadTooLargeError        the request body exceeds the size limit [413]
    ├── AuthenticationError             no credentials, or they are invalid or expired [401]
    │   └── UnknownKeyError             a sealed value names a key this instance does not list [401]
    ├── PermissionDeniedError           authenticated, but not allowed to do this [403]
    ├── NotFoundError                   no such record, or not visible to this caller [404]
    ├── ConflictError                   the record already exists [409]
    ├── PreconditionRequiredError       a conditional header (If-Match) is required [428]
    ├── ConcurrencyConflictError        the ETag is stale: someone changed the record [412]
    ├── RegionMismatchError             the record belongs to another region's deployment [421]
    ├── InvalidStateError               the record is not in a state that allows this [409]
    └── DependencyError                 a service we depend on failed [502]
        ├── StorageUnavailableError     Table/Queue storage unreachable or failing (transient) [503]
        ├── StorageRejectedError        storage refused the request for good (400-class) [500]
        ├── KeyUnavailableError         a stored value names a key not listed here yet [503]
        ├── EhrError                    the EHR refused or failed a call [502]
        └── GraphError                  Microsoft Graph refused or failed a call [502]

Every error has a short, actionable ``detail`` that is safe to show to the caller: it never
contains names, patient identifiers or clinical data. ``problem_type`` is the slug used in the
RFC 9457 ``type`` URI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from connector_core.texts import Text

__all__ = [
    "AuthenticationError",
    "ConcurrencyConflictError",
    "ConflictError",
    "ConnectorError",
    "DependencyError",
    "EhrError",
    "GraphError",
    "InvalidInputError",
    "InvalidStateError",
    "KeyUnavailableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PreconditionRequiredError",
    "RegionMismatchError",
    "SettingsError",
    "StorageUnavailableError",
    "UnknownKeyError",
]


class ConnectorError(Exception):
    """Base class. ``detail`` is safe to show to callers; ``extra`` adds problem+json members."""

    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    problem_type: ClassVar[str] = "internal-error"
    # The detail and action as translatable sentences, for the browser's error page
    # (connector_core.texts.refusal); None: the page shows them in English.
    texts: tuple[Text, Text | None] | None = None

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, Any] = extra


class SettingsError(ConnectorError):
    title = "Invalid settings"
    problem_type = "invalid-settings"

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"Setting {setting}: {problem}", setting=setting)
        self.setting = setting


class InvalidInputError(ConnectorError):
    http_status = 400
    title = "Invalid input"
    problem_type = "invalid-input"


class PayloadTooLargeError(InvalidInputError):
    http_status = 413
    title = "Payload too large"
    problem_type = "payload-too-large"


class AuthenticationError(ConnectorError):
    http_status = 401
    title = "Authentication required"
    problem_type = "unauthenticated"


class UnknownKeyError(AuthenticationError):
    """Sealed with a ``CONNECTOR_SECRET_KEY`` key this instance does not list: forged, or made
    by an instance that already has a newer key list (a rotation in progress). ``keyId`` in
    ``extra`` names the key (an id, never key material)."""

    problem_type = "unknown-key"


class PermissionDeniedError(ConnectorError):
    http_status = 403
    title = "Permission denied"
    problem_type = "forbidden"


class NotFoundError(ConnectorError):
    http_status = 404
    title = "Not found"
    problem_type = "not-found"


class ConflictError(ConnectorError):
    http_status = 409
    title = "Conflict"
    problem_type = "conflict"


class InvalidStateError(ConnectorError):
    http_status = 409
    title = "Not allowed in the current state"
    problem_type = "invalid-state"


class PreconditionRequiredError(ConnectorError):
    http_status = 428
    title = "Precondition required"
    problem_type = "precondition-required"


class ConcurrencyConflictError(ConnectorError):
    http_status = 412
    title = "Precondition failed"
    problem_type = "stale-etag"


class RegionMismatchError(ConnectorError):
    http_status = 421
    title = "Wrong region"
    problem_type = "wrong-region"


class DependencyError(ConnectorError):
    http_status = 502
    title = "A service the connector depends on failed"
    problem_type = "dependency-failed"


class StorageUnavailableError(DependencyError):
    http_status = 503
    title = "Storage unavailable"
    problem_type = "storage-unavailable"


class KeyUnavailableError(DependencyError):
    """A value the connector stored itself (a subscription's clientState) is sealed with a key
    this instance does not list yet: another instance already runs with a newer
    ``CONNECTOR_SECRET_KEY``. Answered 503 so the caller (Graph) delivers again later."""

    http_status = 503
    title = "Key rotation in progress"
    problem_type = "key-unavailable"


class StorageRejectedError(DependencyError):
    """Storage answered a 400-class status other than 404/409/412 (an entity or property too
    large, an invalid value, a refused credential): the same request will never succeed, so it
    is not retried. ``extra`` carries ``status`` and ``code`` (the service's error code)."""

    http_status = 500
    title = "Storage refused the request"
    problem_type = "storage-rejected"


class EhrError(DependencyError):
    title = "EHR error"
    problem_type = "ehr-error"


class GraphError(DependencyError):
    title = "Microsoft Graph error"
    problem_type = "graph-error"
