"""The launch compares the launch's ``iss`` with the config's FHIR base URL in the same canonical
form the portal stores it in (``fhir_probe.canonical_fhir_base_url``): one function for both. The
*authorization response's* ``iss`` (RFC 9207) is another thing: the authorization server's
issuer, compared exactly.

Before the fix the launch used its own normalisation that kept an explicit default port, so an
EHR sending ``https://ehr.example:443/fhir/r4`` for a config stored as
``https://ehr.example/fhir/r4`` was refused as another EHR."""

from __future__ import annotations

import pytest

from connector_core.adapters.fhir_probe import canonical_fhir_base_url
from connector_core.adapters.smart import normalize_fhir_base
from connector_core.errors import AuthenticationError, PermissionDeniedError
from tests.unit.launch_fakes import AS_ISSUER, FHIR, World, make_world, state_of


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.mark.parametrize(
    "iss",
    [
        "https://ehr.example:443/fhir/r4",
        "HTTPS://EHR.Example:443/fhir/r4/",
        "https://ehr.example./fhir/r4",
        " https://ehr.example/fhir/r4 ",
    ],
)
def test_an_iss_spelled_differently_but_canonically_equal_matches(world: World, iss: str) -> None:
    result = world.start(iss=iss)
    assert result.redirect is not None and result.redirect.startswith("https://ehr.example/")


@pytest.mark.parametrize(
    "iss",
    [
        "https://ehr.example:8443/fhir/r4",  # another port is another server
        "http://ehr.example/fhir/r4",  # another scheme
        "https://ehr.example/fhir/R4",  # paths are case-sensitive
        "https://ehr.example/fhir/r4?x=1",  # not a base URL: matches nothing
        "https://user@ehr.example/fhir/r4",
        "https://ehr.example/fhir/r4/../r4",
        "not a url",
    ],
)
def test_other_servers_and_non_base_urls_are_refused(world: World, iss: str) -> None:
    with pytest.raises(PermissionDeniedError, match="does not trust"):
        world.start(iss=iss)


def test_the_callbacks_iss_is_the_authorization_servers_issuer_exactly(world: World) -> None:
    """RFC 9207 section 2.4: the answer's ``iss`` is compared, as a plain string, with the
    authorization server's ``issuer`` from discovery, not with the FHIR base URL (canonical
    or not): an Epic-shaped EHR's issuer is ``.../oauth2`` beside ``.../fhir/r4``."""
    world.map_clinician()
    assert world.callback(state_of(world.start()), iss=AS_ISSUER).redirect
    for wrong in (FHIR, "https://EHR.example:443/fhir/r4/", AS_ISSUER + "/", AS_ISSUER.upper()):
        with pytest.raises(AuthenticationError, match="another server"):
            world.callback(state_of(world.start()), iss=wrong)


@pytest.mark.parametrize(
    "url",
    [
        FHIR,
        "HTTPS://EHR.example:443/fhir/r4/",
        "http://127.0.0.1:8080/fhir",
        "https://[::1]:443/r4",
    ],
)
def test_launch_and_portal_share_one_canonical_form(url: str) -> None:
    assert normalize_fhir_base(url) == canonical_fhir_base_url(url)
