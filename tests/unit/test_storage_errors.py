"""Storage errors say what happened (issue 12, item 2): the Azure adapter keeps the status and
the service's error code; 412 is a stale ETag, 409 a conflict, 404 not found; 408, 429, 5xx,
timeouts and broken connections are passing; every other 400-class answer is permanent."""

from __future__ import annotations

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableTransactionError

from connector_core.adapters.azure_storage import _translate
from connector_core.errors import (
    ConcurrencyConflictError,
    ConflictError,
    NotFoundError,
    StorageRejectedError,
    StorageUnavailableError,
)


def _http(cls: type[HttpResponseError], status: int, code: str | None) -> HttpResponseError:
    error = cls(message=f"{status} {code}")
    error.status_code = status
    error.error_code = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (412, "UpdateConditionNotSatisfied", ConcurrencyConflictError),
        (409, "EntityAlreadyExists", ConflictError),
        (404, "ResourceNotFound", NotFoundError),
        (408, "OperationTimedOut", StorageUnavailableError),
        (429, None, StorageUnavailableError),
        (500, "InternalError", StorageUnavailableError),
        (503, "ServerBusy", StorageUnavailableError),
        (400, "EntityTooLarge", StorageRejectedError),
        (400, "PropertyValueTooLarge", StorageRejectedError),
        (400, "InvalidInput", StorageRejectedError),
        (413, "RequestBodyTooLarge", StorageRejectedError),
        (403, "AuthorizationPermissionMismatch", StorageRejectedError),
    ],
)
def test_status_and_code_decide_and_are_kept(
    status: int, code: str | None, expected: type[Exception]
) -> None:
    for cls in (HttpResponseError, TableTransactionError):
        error = _translate(_http(cls, status, code), "The record")
        assert type(error) is expected
        assert error.extra["status"] == status and error.extra["code"] == code


def test_the_failing_operation_of_a_batch_is_named() -> None:
    error = TableTransactionError(message="3:The property value exceeds the maximum allowed size")
    error.status_code = 400
    error.error_code = "PropertyValueTooLarge"  # type: ignore[attr-defined]
    assert _translate(error, "The record").extra["operation"] == 3


@pytest.mark.parametrize(
    "error",
    [
        ServiceRequestError("connection refused"),
        ServiceResponseError("read timed out"),
        ClientAuthenticationError("the managed identity could not get a token"),
    ],
)
def test_no_answer_at_all_is_passing(error: Exception) -> None:
    translated = _translate(error, "The record")  # type: ignore[arg-type]
    assert isinstance(translated, StorageUnavailableError)
    assert translated.extra["status"] is None


def test_the_sdks_own_types_still_map() -> None:
    assert isinstance(_translate(ResourceModifiedError("x"), "r"), ConcurrencyConflictError)
    assert isinstance(_translate(ResourceExistsError("x"), "r"), ConflictError)
    assert isinstance(_translate(ResourceNotFoundError("x"), "r"), NotFoundError)
