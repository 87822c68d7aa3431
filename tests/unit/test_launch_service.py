"""The launch use cases over in-memory storage and fake SMART / Graph / Entra adapters."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from connector_core.domain.models import ConfigStatus
from connector_core.domain.visit_keys import VisitIdentifier, visit_key
from connector_core.errors import (
    AuthenticationError,
    EhrError,
    GraphError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
)
from connector_core.service.launch import (
    LAUNCH_COOKIE_PREFIX,
    SSO_COOKIE,
    VISIT_COOKIE,
    WAIT_COOKIE,
    LaunchRole,
    complete_sso,
    poll_waiting,
)
from connector_core.service.subscriptions import client_state_of
from tests.unit.launch_fakes import (
    APPOINTMENT_ID,
    AS_ISSUER,
    FHIR,
    ORGANIZER,
    PRACTITIONER,
    SENSITIVE,
    TENANT,
    World,
    make_world,
    state_of,
)


@pytest.fixture
def world() -> World:
    return make_world()


def _sso(world: World, **query: str) -> object:
    flow_state = parse_qs(urlsplit(world_last_redirect[0]).query)["state"][0]
    return world.apply(
        complete_sso(
            world.container, query={"state": flow_state, "code": "x", **query}, cookies=world.jar
        )
    )


world_last_redirect: list[str] = [""]


def _first_launch_with_signin(world: World) -> str:
    result = world.launch()
    assert result.redirect is not None and result.redirect.startswith("https://login.example/")
    world_last_redirect[0] = result.redirect
    done = _sso(world)
    assert done.redirect is not None  # type: ignore[attr-defined]
    return done.redirect  # type: ignore[attr-defined,no-any-return]


# --- start ------------------------------------------------------------------------------------


def test_start_redirects_to_the_authorize_endpoint_with_pkce_and_binding_cookie(
    world: World,
) -> None:
    result = world.start()
    assert result.redirect is not None
    parts = urlsplit(result.redirect)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert result.redirect.startswith("https://ehr.example/oauth2/authorize?")
    assert query["aud"] == FHIR
    assert query["launch"] == "L"
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43
    assert query["scope"] == "launch openid fhirUser"
    assert query["redirect_uri"] == "http://127.0.0.1:7071/api/launch/callback"
    (cookie,) = result.cookies
    assert cookie.name.startswith(LAUNCH_COOKIE_PREFIX) and cookie.max_age == 600
    # the state is sealed: nothing readable in it
    assert "prac" not in query["state"] and FHIR not in query["state"]


def test_patient_launch_asks_for_appointment_read_in_its_compartment(world: World) -> None:
    result = world.start(LaunchRole.PATIENT)
    scope = parse_qs(urlsplit(result.redirect or "").query)["scope"][0]
    assert "patient/Appointment.read" in scope.split()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"iss": "https://other.example/fhir/r4"}, PermissionDeniedError),
        ({"iss": ""}, InvalidInputError),
        ({"launch": ""}, InvalidInputError),
    ],
)
def test_start_refuses_bad_launches(world: World, kwargs: dict[str, str], error: type) -> None:
    with pytest.raises(error):
        world.start(**kwargs)


def test_start_accepts_an_iss_differing_only_in_case_and_slash(world: World) -> None:
    assert world.start(iss="HTTPS://EHR.example/fhir/r4/").redirect


def test_start_refuses_unapproved_and_unknown_configs() -> None:
    world = make_world(status=ConfigStatus.PENDING_APPROVAL)
    with pytest.raises(InvalidStateError):
        world.start()
    world.config = world.config.model_copy(update={"id": "no-such-config"})
    with pytest.raises(NotFoundError):
        world.start()
    world.config = world.config.model_copy(update={"id": "../etc"})
    with pytest.raises(NotFoundError):
        world.start()


def test_start_refuses_an_ehr_without_s256(world: World) -> None:
    world.smart.s256 = False
    with pytest.raises(EhrError, match="S256"):
        world.start()


# --- callback: state --------------------------------------------------------------------------


def test_forged_state_is_refused(world: World) -> None:
    world.start()
    with pytest.raises(AuthenticationError, match="not valid"):
        world.callback("AQ" + "x" * 80)


def test_state_from_another_browser_is_refused(world: World) -> None:
    state = state_of(world.start())
    world.jar.clear()
    with pytest.raises(AuthenticationError, match="browser"):
        world.callback(state)


def test_replayed_state_is_refused(world: World) -> None:
    world.map_clinician()
    state = state_of(world.start())
    saved = dict(world.jar)
    world.callback(state)
    world.jar.update(saved)  # even with the cookie put back
    with pytest.raises(AuthenticationError, match="already used"):
        world.callback(state)


def test_answer_from_another_issuer_is_refused(world: World) -> None:
    state = state_of(world.start())
    with pytest.raises(AuthenticationError, match="another server") as caught:
        world.callback(state, iss="https://evil.example/fhir")
    assert caught.value.extra["reason"] == "iss_mismatch"
    assert world.smart.exchanges == []


# --- callback: RFC 9207 issuer (the authorization server's, not the FHIR base URL) -------------


def test_answer_with_the_fhir_base_as_iss_is_refused(world: World) -> None:
    # Epic's issuer is .../oauth2 beside .../api/FHIR/R4: the FHIR base is not the issuer.
    state = state_of(world.start())
    with pytest.raises(AuthenticationError) as caught:
        world.callback(state, iss=FHIR)
    assert caught.value.http_status == 401
    assert caught.value.extra["reason"] == "iss_mismatch"
    assert world.smart.exchanges == []


def test_answer_without_iss_is_refused_when_the_server_always_sends_it(world: World) -> None:
    state = state_of(world.start())
    with pytest.raises(AuthenticationError) as caught:
        world.callback(state, iss=None)
    assert caught.value.extra["reason"] == "iss_missing"
    assert world.smart.exchanges == []


def test_answer_with_the_authorization_servers_issuer_is_accepted(world: World) -> None:
    world.map_clinician()
    result = world.callback(state_of(world.start()), iss=AS_ISSUER)
    assert result.redirect and result.redirect.startswith("https://teams.example/")
    assert len(world.smart.exchanges) == 1


def test_answer_without_iss_is_accepted_when_the_server_does_not_send_it(world: World) -> None:
    world.map_clinician()
    world.smart.iss_supported = False
    state = state_of(world.start())
    assert world.callback(state, iss=None).redirect
    # but an iss it does send must still be the issuer
    with pytest.raises(AuthenticationError, match="another server"):
        world.callback(state_of(world.start()), iss=FHIR)


def test_state_sealed_with_the_issuer_at_launch_time(world: World) -> None:
    # A server that starts advertising iss support after the launch was sent cannot make a
    # missing iss fail; the issuer the launch was sent to is what the answer is checked against.
    state = state_of(world.start())
    world.smart.issuer = "https://ehr.example/oauth2-moved"
    with pytest.raises(AuthenticationError, match="another server"):
        world.callback(state, iss="https://ehr.example/oauth2-moved")


def test_discovery_issuer_changed_since_the_launch_is_refused(world: World) -> None:
    world.map_clinician()
    state = state_of(world.start())
    world.smart.issuer = "https://ehr.example/oauth2-moved"
    with pytest.raises(AuthenticationError, match="changed during this launch"):
        world.callback(state, iss=AS_ISSUER)
    assert world.smart.exchanges == []


@pytest.mark.parametrize("iss", [FHIR, None], ids=["fhir-base", "missing"])
def test_ehr_error_answers_need_the_issuer_too(world: World, iss: str | None) -> None:
    state = state_of(world.start())
    with pytest.raises(AuthenticationError):
        world.callback(state, code=None, error="access_denied", iss=iss)


def test_ehr_error_answer_with_the_issuer_is_the_ehrs_error(world: World) -> None:
    state = state_of(world.start())
    with pytest.raises(PermissionDeniedError, match="access denied"):
        world.callback(state, code=None, error="access_denied", iss=AS_ISSUER)


def test_launch_uses_the_configs_endpoint_allowance(world: World) -> None:
    world.map_clinician()
    allowance = ("auth.vendor-cloud.example.net",)
    current = world.container.configs.get(TENANT, world.config.id)
    world.container.configs.update(
        current.record.model_copy(update={"ehr_endpoint_hosts": allowance}), expected=current
    )
    state = state_of(world.start())
    assert world.smart.allowed_hosts == allowance
    world.smart.allowed_hosts = ("-",)  # forget what the start passed
    assert world.callback(state).redirect
    assert world.smart.allowed_hosts == allowance  # the callback re-checks with the same one


def test_ehr_access_denied_is_a_clear_error(world: World) -> None:
    state = state_of(world.start())
    with pytest.raises(PermissionDeniedError) as caught:
        world.callback(state, error="access_denied", error_description="<script>")
    assert "access denied" in caught.value.detail
    assert "<script>" not in caught.value.detail
    assert world.smart.exchanges == []


def test_code_verifier_from_the_state_is_sent(world: World) -> None:
    world.map_clinician()
    world.launch()
    (exchange,) = world.smart.exchanges
    assert len(exchange["code_verifier"]) >= 43
    assert exchange["redirect_uri"].endswith("/api/launch/callback")


def test_launch_without_visit_context_is_refused(world: World) -> None:
    world.smart.context = {"patient": "p"}
    with pytest.raises(InvalidInputError, match="which visit"):
        world.launch()


def test_provider_launch_needs_a_practitioner(world: World) -> None:
    world.smart.fhir_user = f"{FHIR}/Patient/p1"
    with pytest.raises(PermissionDeniedError, match="clinician"):
        world.launch()


# --- provider ---------------------------------------------------------------------------------


def test_first_launch_signs_in_then_meeting_and_second_launch_goes_straight(world: World) -> None:
    join = _first_launch_with_signin(world)
    assert join.startswith("https://teams.example/l/meetup-join/")
    assert SSO_COOKIE not in world.jar
    assert VISIT_COOKIE in world.jar
    assert world.graph.calls == ["createOrGet"]  # the subscription is the queue worker's job
    assert world.run_subscription_worker() == 1
    assert world.graph.calls == ["createOrGet", "subscription"]
    mapping = world.container.mappings.get(
        __import__("connector_core.domain.visit_keys", fromlist=["x"]).ehr_user_key(
            world.container.keyring, FHIR, PRACTITIONER
        )
    ).record
    assert mapping.entra_oid == ORGANIZER
    again = world.launch()
    assert again.redirect == join
    assert world.entra.started == 1
    assert world.graph.calls == ["createOrGet", "subscription", "createOrGet"]


def test_repeat_clinician_new_visit_warm_path_is_two_table_operations(world: World) -> None:
    world.map_clinician()
    world.launch()  # warms the config cache
    world.run_subscription_worker()
    world.smart.context["fhirContext"] = [{"reference": "Appointment/another"}]
    world.graph.calls.clear()
    before = world.ops
    result = world.launch()
    assert result.redirect and result.redirect.startswith("https://teams.example/")
    # state nonce and visit (config and mapping cached); the subscription is only queued
    assert world.ops - before == 2
    assert world.graph.calls == ["createOrGet"]
    assert world.run_subscription_worker() == 1
    assert world.graph.calls == ["createOrGet", "subscription"]
    # and when the meeting exists, on the worker that just created it: the nonce only (its
    # subscription was asked for a moment ago); createOrGet, nothing queued
    world.graph.calls.clear()
    before = world.ops
    world.launch()
    assert world.ops - before == 1
    assert world.graph.calls == ["createOrGet"]
    assert world.run_subscription_worker() == 0


def test_repeat_launch_reads_the_visit_when_its_copy_cannot_settle_the_subscription(
    world: World,
) -> None:
    world.map_clinician()
    world.launch()
    assert world.run_subscription_worker() == 1  # the row has the subscription, the copy not
    start = world.container.clock()
    world.container.clock = lambda: start + timedelta(minutes=2)  # past the grace
    before = world.ops
    world.launch()
    assert world.ops - before == 2  # nonce and the visit read, which shows it live
    assert world.run_subscription_worker() == 0  # nothing asked again
    before = world.ops
    world.launch()
    assert world.ops - before == 1  # the copy now settles it
    assert world.run_subscription_worker() == 0


def test_visit_record_holds_keys_and_sealed_refs_only(world: World) -> None:
    world.map_clinician()
    world.launch()
    world.run_subscription_worker()
    dump = json.dumps(world.container.store.dump())  # type: ignore[attr-defined]
    for value in SENSITIVE:
        assert value not in dump
    key = visit_key(
        world.container.keyring, world.config.id, VisitIdentifier("appointment", APPOINTMENT_ID)
    )
    visit = world.container.visits.get(key).record
    refs = world.container.keyring.unseal("visit-context", visit.sealed_context or "")
    assert refs["practitioner"] == PRACTITIONER
    assert refs["appointment"] == f"Appointment/{APPOINTMENT_ID}"
    assert visit.organizer_oid == ORGANIZER
    assert visit.subscription_id in world.graph.subscriptions
    sub = world.container.subscriptions.get(visit.subscription_id or "").record
    assert sub.visit_key == key
    assert client_state_of(world.container, sub) == world.graph.subscriptions[sub.subscription_id]


def test_subscription_failure_does_not_block_and_is_retried_with_backoff(world: World) -> None:
    world.map_clinician()
    world.graph.subscription_error = GraphError(
        "Microsoft Teams is busy right now.", reason="throttled", graphStatus=429, retryAfter=7
    )
    assert world.launch().redirect  # the clinician is in the meeting already
    queue = world.container.queue
    sent: list[tuple[str, int | None]] = []
    original = queue.send_message

    def record(name: str, body: str, *, visibility_timeout: int | None = None) -> None:
        sent.append((name, visibility_timeout))
        original(name, body, visibility_timeout=visibility_timeout)

    queue.send_message = record  # type: ignore[method-assign]
    world.run_subscription_worker(limit=2)  # the first try, then the first retry
    # Retry-After (7 s) outranks the first backoff step (2 s), then the second step (10 s)
    assert sent == [("meeting-subscriptions", 7), ("meeting-subscriptions", 10)]
    world.graph.subscription_error = None
    assert world.run_subscription_worker() == 1
    assert len(world.graph.subscriptions) == 1
    key = visit_key(
        world.container.keyring, world.config.id, VisitIdentifier("appointment", APPOINTMENT_ID)
    )
    assert world.container.visits.get(key).record.subscription_id in world.graph.subscriptions
    assert not queue.queues["meeting-subscriptions-poison"]  # type: ignore[attr-defined]


def test_subscription_retries_end_in_the_poison_queue_with_the_reason(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.map_clinician()
    world.graph.subscription_error = GraphError("busy", reason="throttled", graphStatus=503)
    world.launch()
    assert world.run_subscription_worker() == 6  # first try + 5 retries
    poison = world.container.queue.queues["meeting-subscriptions-poison"]  # type: ignore[attr-defined]
    assert len(poison) == 1 and "visitKey" in poison[0]
    assert "subscription.poisoned" in caplog.text and "retries exhausted" in caplog.text.replace(
        "_", " "
    )


def test_a_permanent_graph_refusal_is_poisoned_at_once(world: World) -> None:
    world.map_clinician()
    world.graph.subscription_error = GraphError(
        "no policy", reason="application_access_policy", graphStatus=403
    )
    world.launch()
    assert world.run_subscription_worker() == 1
    poison = world.container.queue.queues["meeting-subscriptions-poison"]  # type: ignore[attr-defined]
    assert len(poison) == 1


def test_a_request_for_a_deleted_visit_is_dropped(world: World) -> None:
    from connector_core.service.subscriptions import request_subscription

    request_subscription(world.container, "no-such-visit", reason="test")
    assert world.run_subscription_worker() == 1
    assert world.graph.calls == []
    assert not world.container.queue.queues["meeting-subscriptions-poison"]  # type: ignore[attr-defined]


def test_mapping_cached_by_another_worker_is_re_read_before_signing_in_again(
    world: World,
) -> None:
    world.map_clinician()
    world.launch()  # cached here
    world.map_clinician(oid="33333333-0000-0000-0000-000000000000")  # re-established elsewhere
    world.smart.context["fhirContext"] = [{"reference": "Appointment/another"}]
    world.graph.meeting_error = GraphError("no user", reason="user_not_found")
    calls = world.graph.calls

    def fail_once(**kwargs: object) -> object:
        world.graph.create_or_get_meeting = original  # type: ignore[method-assign]
        calls.append("createOrGet")
        raise GraphError("no user", reason="user_not_found")

    original = type(world.graph).create_or_get_meeting.__get__(world.graph)
    world.graph.meeting_error = None
    world.graph.create_or_get_meeting = fail_once  # type: ignore[method-assign,assignment]
    result = world.launch()
    assert result.redirect and result.redirect.startswith("https://teams.example/")
    assert world.entra.started == 0


def test_stale_mapping_is_re_established(world: World) -> None:
    world.map_clinician(oid="99999999-0000-0000-0000-000000000000")
    world.graph.meeting_error = GraphError("no user", reason="user_not_found")
    result = world.launch()
    assert result.redirect and result.redirect.startswith("https://login.example/")
    world.graph.meeting_error = None
    world_last_redirect[0] = result.redirect
    done = _sso(world)
    assert done.redirect.startswith("https://teams.example/")  # type: ignore[attr-defined]


def test_access_policy_403_becomes_a_page_for_the_admin(world: World) -> None:
    world.map_clinician()
    world.graph.meeting_error = GraphError(
        "no policy", reason="application_access_policy", action="Contact your administrator"
    )
    with pytest.raises(PermissionDeniedError) as caught:
        world.launch()
    assert "administrator" in caught.value.extra["action"]


def test_sso_from_another_tenant_is_refused(world: World) -> None:
    world.entra.user = type(world.entra.user)(oid=ORGANIZER, tid="other-tenant")
    result = world.launch()
    world_last_redirect[0] = result.redirect or ""
    with pytest.raises(PermissionDeniedError, match="another organization"):
        _sso(world)


def test_sso_replay_and_missing_cookie_are_refused(world: World) -> None:
    result = world.launch()
    world_last_redirect[0] = result.redirect or ""
    saved = dict(world.jar)
    _sso(world)
    world.jar.update(saved)
    with pytest.raises(AuthenticationError, match="already used"):
        _sso(world)
    world.jar.clear()  # a reload after success has no cookie either: still "already used"
    with pytest.raises(AuthenticationError, match="already used"):
        _sso(world)


def test_sso_error_answer_is_clear(world: World) -> None:
    result = world.launch()
    world_last_redirect[0] = result.redirect or ""
    with pytest.raises(AuthenticationError, match="access_denied"):
        _sso(world, error="access_denied")


def test_group_visit_launches_share_one_meeting(world: World) -> None:
    world.use_conference()
    world.map_clinician()
    first = world.launch()
    # the interpreter (another practitioner, another Entra user) joins the same meeting
    world.smart.fhir_user = f"{FHIR}/Practitioner/interpreter-1"
    world.map_clinician("Practitioner/interpreter-1", oid="22222222-0000-0000-0000-000000000000")
    world.smart.context["fhirContext"][0] = {"reference": "Appointment/other-appt"}
    second = world.launch()
    assert first.redirect == second.redirect
    assert world.graph.calls.count("createOrGet") == 1


# --- patient ----------------------------------------------------------------------------------


def test_patient_joins_the_clinicians_meeting_as_a_browser_guest(world: World) -> None:
    world.map_clinician()
    join = world.launch().redirect or ""
    world.smart.fhir_user = f"{FHIR}/Patient/pat-secret-1"
    patient = world.launch(LaunchRole.PATIENT)
    assert patient.redirect == join + "&anon=true"
    assert world.smart.reads == []  # no FHIR read when the meeting exists


def test_patient_first_creates_the_meeting_as_the_mapped_practitioner(world: World) -> None:
    world.map_clinician()
    world.smart.fhir_user = f"{FHIR}/Patient/pat-secret-1"
    patient = world.launch(LaunchRole.PATIENT)
    assert patient.redirect and patient.redirect.endswith("&anon=true")
    assert world.smart.reads == [f"Appointment/{APPOINTMENT_ID}"]
    world.smart.fhir_user = f"{FHIR}/{PRACTITIONER}"
    clinician = world.launch()
    assert patient.redirect == (clinician.redirect or "") + "&anon=true"


def test_patient_waits_until_the_clinician_starts(world: World) -> None:
    world.smart.fhir_user = f"{FHIR}/Patient/pat-secret-1"
    waiting = world.launch(LaunchRole.PATIENT)
    assert waiting.waiting and WAIT_COOKIE in world.jar
    assert poll_waiting(world.container, cookies=world.jar).waiting
    world.smart.fhir_user = f"{FHIR}/{PRACTITIONER}"
    world.map_clinician()
    join = world.launch().redirect
    moved = world.apply(poll_waiting(world.container, cookies=world.jar))
    assert moved.redirect == f"{join}&anon=true"
    assert WAIT_COOKIE not in world.jar


def test_waiting_page_without_its_cookie_is_refused(world: World) -> None:
    with pytest.raises(AuthenticationError):
        poll_waiting(world.container, cookies={})
    with pytest.raises(AuthenticationError):
        poll_waiting(world.container, cookies={WAIT_COOKIE: "forged"})


def test_patient_link_used_by_staff_is_refused(world: World) -> None:
    with pytest.raises(PermissionDeniedError):
        world.launch(LaunchRole.PATIENT)


def test_redirect_to_a_non_https_meeting_is_refused_outside_dev_mode() -> None:
    from tests.helpers import in_memory_container
    from tests.unit import launch_fakes

    world = make_world()
    strict = in_memory_container(CONNECTOR_DEV_MODE=None)
    strict.store = world.container.store
    assert strict.settings.dev_mode is False
    from connector_core.service.launch import _safe_location

    with pytest.raises(EhrError):
        _safe_location(strict, "http://teams.example/l/x", "meeting link")
    with pytest.raises(EhrError):
        _safe_location(world.container, "https://teams.example/\r\nSet-Cookie: x", "meeting link")
    assert launch_fakes.TENANT == TENANT
