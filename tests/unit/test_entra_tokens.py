"""PortalTokenValidator: signature via the tenant's JWKS (cached, refreshed on unknown kid,
rate-limited), iss per tid, audience, times with leeway, RS256 only."""

from __future__ import annotations

from typing import Any

import pytest

from connector_core.errors import AuthenticationError
from tests.unit.portal_fakes import AUTHORITY, CLIENT_ID, TENANT_A, TENANT_B, FakeEntra


@pytest.fixture
def entra() -> FakeEntra:
    return FakeEntra()


def test_valid_token_yields_verified_claims(entra: FakeEntra) -> None:
    claims = entra.validator().validate(entra.token(upn="Admin@Contoso.example"))
    assert claims["tid"] == TENANT_A
    assert claims["preferred_username"] == "Admin@Contoso.example"
    assert claims["roles"] == ["Connector.Admin"]


def test_client_id_audience_is_accepted_too(entra: FakeEntra) -> None:
    assert entra.validator().validate(entra.token(aud=CLIENT_ID))["aud"] == CLIENT_ID


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"lifetime": -120}, "expired"),
        ({"issued_offset": 600}, "not valid yet"),
        ({"aud": "api://another-app"}, "another API"),
        ({"iss": f"{AUTHORITY}/{TENANT_B}/v2.0"}, "issuer"),
        ({"iss": f"https://evil.example/{TENANT_A}/v2.0"}, "issuer"),
        ({"alg": "none"}, "algorithm"),
        ({"alg": "HS256"}, "algorithm"),
        ({"alg": "RS384"}, "algorithm"),
        ({"alg": "PS256"}, "algorithm"),
        ({"tid": "not-a-guid"}, "tenant"),
        ({"tid": "33333333-3333-4333-8333-333333333333"}, "not known"),
    ],
)
def test_refused_tokens(entra: FakeEntra, kwargs: dict[str, object], words: str) -> None:
    token = entra.token(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError) as exc:
        entra.validator().validate(token)
    assert words in exc.value.detail
    assert exc.value.http_status == 401


def test_small_clock_skew_is_tolerated(entra: FakeEntra) -> None:
    validator = entra.validator()
    validator.validate(entra.token(lifetime=-30))  # expired 30 s ago: within 60 s leeway
    validator.validate(entra.token(issued_offset=30))  # issued 30 s "in the future"


def test_tampered_payload_fails_signature(entra: FakeEntra) -> None:
    import base64
    import json

    head, payload, sig = entra.token(roles=()).split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["roles"] = ["Connector.Admin"]
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthenticationError, match="signature"):
        entra.validator().validate(f"{head}.{forged}.{sig}")


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "x" * 20000, "e30.e30.e30"])
def test_garbage_is_401(entra: FakeEntra, junk: str) -> None:
    with pytest.raises(AuthenticationError):
        entra.validator().validate(junk)


def test_jwks_is_cached_per_tenant(entra: FakeEntra) -> None:
    validator = entra.validator()
    for _ in range(5):
        validator.validate(entra.token())
    validator.validate(entra.token(tid=TENANT_B))
    assert validator.fetches == 2
    assert entra.requests.count(f"/{TENANT_A}/v2.0/.well-known/openid-configuration") == 1


def test_unknown_kid_refreshes_once_then_accepts_rolled_key(entra: FakeEntra) -> None:
    clock = [1000.0]
    validator = entra.validator(clock=lambda: clock[0])
    validator.validate(entra.token())
    new_kid = entra.add_key()  # Entra rolls its keys
    clock[0] += 120
    assert validator.validate(entra.token(kid=new_kid))["tid"] == TENANT_A
    assert validator.fetches == 2


def test_unknown_kid_refresh_is_rate_limited(entra: FakeEntra) -> None:
    clock = [1000.0]
    validator = entra.validator(clock=lambda: clock[0])
    validator.validate(entra.token())
    rogue = entra.add_key(publish=False)  # an attacker's key: never in the JWKS
    clock[0] += 120
    for _ in range(10):
        with pytest.raises(AuthenticationError, match="unknown key"):
            validator.validate(entra.token(kid=rogue))
    assert validator.fetches == 2  # one refresh for the first unknown kid, then none


def test_jwks_expires_after_ttl(entra: FakeEntra) -> None:
    clock = [1000.0]
    validator = entra.validator(clock=lambda: clock[0], jwks_ttl_seconds=300)
    validator.validate(entra.token())
    clock[0] += 301
    validator.validate(entra.token())
    assert validator.fetches == 2


def test_unknown_tenant_is_remembered(entra: FakeEntra) -> None:
    validator = entra.validator()
    stranger = "44444444-4444-4444-8444-444444444444"
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            validator.validate(entra.token(tid=stranger))
    assert entra.requests.count(f"/{stranger}/v2.0/.well-known/openid-configuration") == 1


def test_entra_unreachable_is_a_dependency_error_not_acceptance() -> None:
    import httpx

    from connector_core.adapters.entra_tokens import PortalTokenValidator
    from connector_core.errors import DependencyError

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down")

    entra = FakeEntra()
    validator = PortalTokenValidator(
        http=httpx.Client(transport=httpx.MockTransport(down)),
        authority_host=AUTHORITY,
        audiences=("api://x",),
    )
    with pytest.raises(DependencyError):
        validator.validate(entra.token())


# --- bounded work for unsigned tokens (issue 12, item 5) -----------------------------------------


class FailingEntra(FakeEntra):
    """Entra answering 503 for every tenant in ``failing`` (a tid is read before any check)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    def handler(self, request: Any) -> Any:
        import httpx

        tid = request.url.path.strip("/").split("/")[0]
        if tid in self.failing or tid not in self.tenants:
            self.requests.append(request.url.path)
            return httpx.Response(503 if tid in self.failing else 400)
        return super().handler(request)


def _fresh_tid() -> str:
    import uuid

    return str(uuid.uuid4())


def test_a_tenant_entra_fails_for_is_remembered_briefly() -> None:
    from connector_core.errors import DependencyError

    entra = FailingEntra()
    entra.failing.add(TENANT_A)
    clock = [1000.0]
    validator = entra.validator(clock=lambda: clock[0], failure_ttl_seconds=30)
    for _ in range(5):
        with pytest.raises(DependencyError):
            validator.validate(entra.token())
    assert validator.requests == 1  # the 5xx is remembered: one call to Entra, not five
    entra.failing.clear()
    clock[0] += 31
    assert validator.validate(entra.token())["tid"] == TENANT_A


def test_fifty_unsigned_tokens_with_fresh_tenants_cost_a_bounded_number_of_calls() -> None:
    from connector_core.errors import DependencyError

    entra = FailingEntra()
    tids = [_fresh_tid() for _ in range(50)]
    entra.failing.update(tids)  # Entra 5xx: nothing it could be told to remember
    validator = entra.validator(new_tenants_per_minute=10)
    for tid in tids:
        with pytest.raises(DependencyError):
            validator.validate(entra.token(tid=tid))
    assert validator.requests <= 10
    # a tenant already known keeps working meanwhile
    good = FakeEntra()
    warm = good.validator(new_tenants_per_minute=1)
    warm.validate(good.token())
    for _ in range(5):
        with pytest.raises((DependencyError, AuthenticationError)):
            warm.validate(good.token(tid=_fresh_tid()))
    assert warm.validate(good.token())["tid"] == TENANT_A


def test_concurrent_requests_for_one_tenant_fetch_its_keys_once(entra: FakeEntra) -> None:
    import threading

    validator = entra.validator()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def one() -> None:
        barrier.wait()
        try:
            validator.validate(entra.token())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and validator.fetches == 1
    assert entra.requests.count(f"/{TENANT_A}/v2.0/.well-known/openid-configuration") == 1
