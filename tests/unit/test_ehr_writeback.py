"""EhrWriter over httpx.MockTransport: which EHR answers mean "the token was rejected" (the
caller then fetches a fresh token once), and ``fresh`` dropping the cached token."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from connector_core.adapters.ehr_writeback import EhrWriter
from connector_core.errors import EhrError

BASE = "https://ehr.example/api/FHIR/R4"


class Tokens:
    """The SmartClient side of EhrWriter: records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.issued = 0

    def get_configuration(self, fhir_base_url: str, *, allowed_hosts: Any = ()) -> str:
        self.calls.append(("discovery", tuple(allowed_hosts)))
        return "smart"

    def backend_token(self, smart: Any, *, client_id: str, scope: str) -> str:
        self.issued += 1
        self.calls.append(("token", scope))
        return f"t{self.issued}"

    def forget_backend_token(self, smart: Any, *, client_id: str, scope: str) -> None:
        self.calls.append(("forget", scope))


def _writer(status: int, headers: dict[str, str] | None = None) -> tuple[EhrWriter, Tokens]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers or {}, json={"resourceType": "x"})

    tokens = Tokens()
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return EhrWriter(http=http, tokens=tokens), tokens


@pytest.mark.parametrize(
    ("status", "headers", "rejected"),
    [
        (401, {}, True),
        (401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, True),
        (403, {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="x"'}, True),
        (403, {"WWW-Authenticate": 'Bearer error="insufficient_scope"'}, False),
        (403, {}, False),
        (500, {}, False),
        (503, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, False),
    ],
)
def test_token_rejection_is_marked(status: int, headers: dict[str, str], rejected: bool) -> None:
    writer, _ = _writer(status, headers)
    with pytest.raises(EhrError) as caught:
        writer.post_audit_event(BASE, {"resourceType": "AuditEvent"}, token="t")
    assert caught.value.extra["ehrStatus"] == status
    assert (caught.value.extra.get("reason") == "token_rejected") is rejected


def test_accepted_write_raises_nothing() -> None:
    writer, _ = _writer(201)
    writer.post_audit_event(BASE, {"resourceType": "AuditEvent"}, token="t")


def test_fresh_token_drops_the_cached_one_first() -> None:
    writer, tokens = _writer(201)
    scope = "system/AuditEvent.write"
    allowance = ("auth.vendor-cloud.example.net",)
    assert writer.backend_token(BASE, client_id="c", scope=scope, allowed_hosts=allowance) == "t1"
    assert tokens.calls == [("discovery", allowance), ("token", scope)]
    tokens.calls.clear()
    assert writer.backend_token(BASE, client_id="c", scope=scope, fresh=True) == "t2"
    assert tokens.calls == [("discovery", ()), ("forget", scope), ("token", scope)]
