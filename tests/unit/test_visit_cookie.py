"""The clinician's visit cookie holds the most recent visits: a second launch keeps the first
visit's page and live view; a ninth evicts the oldest; each visit expires on its own; the
cookie stays far below 4 KB; a cookie of the single-visit format is still accepted. Driven as
the worker runs the routes (real func objects, in-memory storage, one cookie jar)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import azure.functions as func
import pytest

from connector_core.bootstrap import reset_container, set_container
from connector_core.domain.models import ProviderLanding
from connector_core.service.launch import VISIT_COOKIE, LaunchResult
from connector_core.service.visit_cookie import MAX_VISITS, add_visit, cookie_visits
from functions.launch import _set_cookie
from functions.visits import visit_page, visit_participants
from tests.unit.launch_fakes import APPOINTMENT_ID, World, make_world


@pytest.fixture
def world() -> Iterator[World]:
    created = make_world(landing=ProviderLanding.VISIT_PAGE)
    created.map_clinician()
    set_container(created.container)
    yield created
    reset_container()


def _launch_visit(world: World, appointment: str) -> str:
    """A clinician's launch of the visit of ``appointment`` in this browser: its visit key."""
    world.smart.context["fhirContext"] = [{"reference": f"Appointment/{appointment}"}]
    result: LaunchResult = world.launch()
    assert result.redirect and "/visits/" in result.redirect
    return result.redirect.rsplit("/", 1)[-1]


def _get(route: str, key: str, cookie: str | None) -> func.HttpRequest:
    return func.HttpRequest(
        method="GET",
        url=f"http://127.0.0.1/api/{route}",
        headers={"cookie": f"{VISIT_COOKIE}={cookie}"} if cookie else {},
        params={},
        route_params={"visitKey": key},
        body=b"",
    )


def _statuses(world: World, key: str) -> tuple[int, int]:
    """(visit page, /participants JSON) status codes for ``key`` with the jar's visit cookie."""
    cookie = world.jar.get(VISIT_COOKIE)
    page = visit_page(_get(f"visits/{key}", key, cookie))
    view = visit_participants(_get(f"visits/{key}/participants", key, cookie))
    return page.status_code, view.status_code


def test_two_visits_launched_in_one_browser_both_stay_open(world: World) -> None:
    first = _launch_visit(world, APPOINTMENT_ID)
    assert _statuses(world, first) == (200, 200)
    second = _launch_visit(world, "appt-secret-2")
    assert second != first
    assert _statuses(world, second) == (200, 200)
    assert _statuses(world, first) == (200, 200)  # the first visit's page still works
    held = cookie_visits(world.container.keyring, world.jar[VISIT_COOKIE])
    assert [key for key, _ in held] == [second, first]  # newest first


def test_a_ninth_visit_evicts_the_oldest(world: World) -> None:
    keys = [_launch_visit(world, f"appt-secret-{n}") for n in range(MAX_VISITS + 1)]
    assert len(set(keys)) == MAX_VISITS + 1
    held = [key for key, _ in cookie_visits(world.container.keyring, world.jar[VISIT_COOKIE])]
    assert held == keys[::-1][:MAX_VISITS]
    page, view = _statuses(world, keys[0])
    assert (page, view) == (403, 403)  # evicted: this browser no longer opens it
    assert _statuses(world, keys[1]) == (200, 200)
    assert _statuses(world, keys[-1]) == (200, 200)


def test_launching_a_held_visit_again_moves_it_first_without_a_duplicate(world: World) -> None:
    first = _launch_visit(world, APPOINTMENT_ID)
    second = _launch_visit(world, "appt-secret-2")
    assert _launch_visit(world, APPOINTMENT_ID) == first
    held = [key for key, _ in cookie_visits(world.container.keyring, world.jar[VISIT_COOKIE])]
    assert held == [first, second]


def test_the_cookie_stays_far_below_4_kb_with_the_most_visits_and_longest_keys(
    world: World,
) -> None:
    keyring = world.container.keyring
    sealed: str | None = None
    for n in range(MAX_VISITS + 3):
        sealed, max_age = add_visit(keyring, sealed, f"{n:x}".rjust(64, "a"))
    assert sealed is not None
    assert len(cookie_visits(keyring, sealed)) == MAX_VISITS
    from connector_core.service.launch import SetCookie

    header = _set_cookie(SetCookie(VISIT_COOKIE, sealed, max_age))
    assert len(header) < 1200, len(header)  # browsers keep 4096 bytes per cookie


def test_each_visit_expires_on_its_own(world: World) -> None:
    keyring = world.container.keyring
    now = int(time.time())
    old, fresh = "a" * 32, "b" * 32
    sealed = keyring.seal(
        "visit-cookie",
        {"role": "provider", "visits": [[fresh, now + 600], [old, now - 1]]},
        ttl_seconds=600,
    )
    assert [key for key, _ in cookie_visits(keyring, sealed)] == [fresh]
    renewed, _ = add_visit(keyring, sealed, "c" * 32)
    assert [key for key, _ in cookie_visits(keyring, renewed)] == ["c" * 32, fresh]


def test_an_old_single_visit_cookie_is_accepted_and_kept(world: World) -> None:
    first = _launch_visit(world, APPOINTMENT_ID)
    # the format sealed before this cookie held several visits
    world.jar[VISIT_COOKIE] = world.container.keyring.seal(
        "visit-cookie", {"visit_key": first, "role": "provider"}, ttl_seconds=3600
    )
    assert _statuses(world, first) == (200, 200)
    second = _launch_visit(world, "appt-secret-2")
    assert _statuses(world, first) == (200, 200)
    assert _statuses(world, second) == (200, 200)


def test_a_forged_or_foreign_cookie_is_started_afresh_and_still_refused(world: World) -> None:
    keyring = world.container.keyring
    patient_role = keyring.seal(
        "visit-cookie", {"role": "patient", "visits": [["a" * 32, int(time.time()) + 60]]}
    )
    assert cookie_visits(keyring, patient_role) == []
    renewed, _ = add_visit(keyring, "not-sealed", "b" * 32)
    assert [key for key, _ in cookie_visits(keyring, renewed)] == ["b" * 32]
    first = _launch_visit(world, APPOINTMENT_ID)
    world.jar[VISIT_COOKIE] = "not-sealed"
    assert _statuses(world, first) == (401, 401)
