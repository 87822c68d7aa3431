"""What a refused callback says: "already used", "another browser" and "expired" are told apart
(from the sealed state itself and the browser's cookie), each with what to do next; setup
mistakes (a config not approved yet) get their own message. The error page says them in the
reader's language (English, Brazilian Portuguese, Spanish)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
import pytest

from connector_core.bootstrap import reset_container, set_container
from connector_core.domain.models import ConfigStatus
from connector_core.errors import AuthenticationError, InvalidStateError
from connector_core.service.launch import SSO_COOKIE, complete_sso
from tests.unit.launch_fakes import World, make_world, state_of

CLICK_AGAIN = "Go back to the EHR and click Start virtual visit again."


@pytest.fixture
def world() -> World:
    return make_world()


def _refusal(world: World, state: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        world.callback(state)
    assert CLICK_AGAIN in str(caught.value.extra["action"])
    return caught.value


def _reseal_expired(world: World, state: str) -> str:
    """The same state, sealed as the connector sealed it, but past its 10 minutes."""
    keyring = world.container.keyring
    return keyring.seal("launch-state", keyring.unseal("launch-state", state), ttl_seconds=-1)


def test_reloading_the_callback_after_success_says_already_used(world: World) -> None:
    world.map_clinician()
    state = state_of(world.start())
    assert world.callback(state).redirect  # into the meeting; the binding cookie is cleared
    error = _refusal(world, state)  # the same URL again (a reload), in the same browser
    assert error.extra["reason"] == "state_used"
    assert "already used" in error.detail
    assert "another browser" not in error.detail


def test_a_callback_in_another_browser_says_so(world: World) -> None:
    state = state_of(world.start())
    world.jar.clear()  # another cookie jar: never saw this launch's cookie
    error = _refusal(world, state)
    assert error.extra["reason"] == "other_browser"
    assert "did not start in this browser" in error.detail
    assert "cookie" in str(error.extra["action"])


def test_a_used_answer_opened_in_another_browser_says_already_used(world: World) -> None:
    world.map_clinician()
    state = state_of(world.start())
    world.callback(state)
    world.jar.clear()
    assert _refusal(world, state).extra["reason"] == "state_used"


def test_a_late_callback_says_expired(world: World) -> None:
    state = state_of(world.start())
    before = world.ops
    error = _refusal(world, _reseal_expired(world, state))
    assert error.extra["reason"] == "state_expired"
    assert "10 minutes" in error.detail
    assert world.ops == before  # told from the sealed state itself, no table read


def test_an_altered_state_is_not_called_expired(world: World) -> None:
    state = state_of(world.start())
    tampered = state[:-2] + ("AA" if state[-2:] != "AA" else "BB")
    error = _refusal(world, tampered)
    assert error.extra["reason"] == "state_invalid"
    assert "not valid" in error.detail


def test_the_success_path_reads_nothing_more(world: World) -> None:
    """The "already used" check is on the error path only."""
    world.map_clinician()
    world.launch()  # warms the caches, creates the visit
    before = world.ops
    world.launch()
    repeat = world.ops - before
    fresh = make_world()
    fresh.map_clinician()
    fresh.launch()
    fresh_before = fresh.ops
    fresh.launch()
    assert repeat == fresh.ops - fresh_before
    assert repeat <= 2  # the state nonce and the visit read


# --- the Microsoft sign-in callback ------------------------------------------------------------


def _to_sso(world: World) -> str:
    """A first-time clinician's launch, up to Microsoft sign-in: its answer's state."""
    result = world.launch()
    assert result.redirect and result.redirect.startswith("https://login.example/")
    return parse_qs(urlsplit(result.redirect).query)["state"][0]


def _sso(world: World, flow_state: str) -> None:
    world.apply(
        complete_sso(world.container, query={"state": flow_state, "code": "x"}, cookies=world.jar)
    )


def _sso_refusal(world: World, flow_state: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        _sso(world, flow_state)
    assert CLICK_AGAIN in str(caught.value.extra["action"])
    return caught.value


def test_reloading_the_sso_callback_after_success_says_already_used(world: World) -> None:
    flow_state = _to_sso(world)
    _sso(world, flow_state)
    assert SSO_COOKIE not in world.jar
    assert _sso_refusal(world, flow_state).extra["reason"] == "state_used"


def test_the_sso_callback_in_another_browser_says_so(world: World) -> None:
    flow_state = _to_sso(world)
    world.jar.clear()
    assert _sso_refusal(world, flow_state).extra["reason"] == "other_browser"


def test_a_late_sso_callback_says_expired(world: World) -> None:
    flow_state = _to_sso(world)
    keyring = world.container.keyring
    sealed = keyring.seal(
        "launch-sso", keyring.unseal("launch-sso", world.jar[SSO_COOKIE]), ttl_seconds=-1
    )
    world.jar[SSO_COOKIE] = sealed
    assert _sso_refusal(world, flow_state).extra["reason"] == "state_expired"


def test_the_sso_cookie_outlives_its_sealed_value(world: World) -> None:
    """So a late answer still finds the cookie and can say "expired"."""
    result = world.start()
    world.jar.clear()
    world.apply(result)
    launched = world.callback(state_of(result))
    (cookie,) = [c for c in launched.cookies if c.name == SSO_COOKIE]
    assert cookie.max_age > 600


# --- setup mistakes ------------------------------------------------------------------------------


def test_a_launch_of_a_config_not_yet_approved_says_what_to_do() -> None:
    world = make_world(status=ConfigStatus.PENDING_APPROVAL)
    with pytest.raises(InvalidStateError) as caught:
        world.start()
    assert caught.value.extra["reason"] == "not_approved"
    assert caught.value.http_status == 409
    assert "not approved yet" in caught.value.detail
    assert "approver" in str(caught.value.extra["action"])


# --- the approver's EHR sign-in callback ---------------------------------------------------------


def test_the_approvers_late_ehr_signin_says_expired_and_a_forged_one_not_valid() -> None:
    from connector_core.service.configs import complete_ehr_signin
    from tests.helpers import in_memory_container

    container = in_memory_container()
    late = container.keyring.seal("ehr-signin-state", {"sid": "s", "cid": "c"}, ttl_seconds=-1)
    with pytest.raises(AuthenticationError) as caught:
        complete_ehr_signin(container, state=late, code="c", error=None)
    assert caught.value.extra["reason"] == "state_expired"
    assert "10 minutes" in caught.value.detail
    with pytest.raises(AuthenticationError) as caught:
        complete_ehr_signin(container, state="AQ" + "x" * 80, code="c", error=None)
    assert caught.value.extra["reason"] == "state_invalid"


# --- the error page speaks the reader's language -------------------------------------------------


def _page(
    route: Callable[[func.HttpRequest], func.HttpResponse], world: World, **params: str
) -> func.HttpResponse:
    """The route's answer to a browser with ``world``'s cookies (``lang`` sets Accept-Language)."""
    language = params.pop("lang", "en")
    cookie = "; ".join(f"{name}={value}" for name, value in world.jar.items())
    request = func.HttpRequest(
        method="GET",
        url="http://127.0.0.1/api/launch/callback",
        headers={"accept-language": language, **({"cookie": cookie} if cookie else {})},
        params=params,
        body=b"",
    )
    set_container(world.container)
    try:
        return route(request)
    finally:
        reset_container()


def _paragraphs(response: func.HttpResponse) -> tuple[str, str]:
    """The page's "what happened" and "what to do" paragraphs, as marked up."""
    text = response.get_body().decode()
    what = re.search(r'<p class="what"[^>]*>[^<]*</p>', text)
    todo = re.search(r'<p class="todo"[^>]*>[^<]*</p>', text)
    assert what and todo, text
    return html.unescape(what.group(0)), html.unescape(todo.group(0))


@pytest.mark.parametrize(
    ("language", "message", "next_step"),
    [
        (
            "pt-BR",
            "Este link de inicialização já foi usado: ele abriu a consulta uma vez",
            "Volte ao EHR e clique novamente em Iniciar consulta virtual. Cada clique gera um "
            "novo link.",
        ),
        (
            "es",
            "Este enlace de inicio ya se usó: abrió la visita una vez",
            "Vuelva a la HCE y haga clic de nuevo en Iniciar visita virtual. Cada clic genera un "
            "enlace nuevo.",
        ),
    ],
)
def test_an_already_used_callback_page_is_in_the_readers_language(
    world: World, language: str, message: str, next_step: str
) -> None:
    from functions.launch import launch_callback

    world.map_clinician()
    state = state_of(world.start())
    world.callback(state)  # the visit opened; the same answer again is a reload
    page = _page(launch_callback, world, state=state, code="c", lang=language)
    assert page.status_code == 401
    assert page.headers["content-language"] == language
    what, todo = _paragraphs(page)
    assert message in what and 'lang="en"' not in what  # translated: not marked as English
    assert next_step in todo and 'lang="en"' not in todo
    english = _page(launch_callback, world, state=state, code="c")
    what, todo = _paragraphs(english)
    assert "This launch link was already used: it opened the visit once" in what
    assert f"{CLICK_AGAIN} Each click gives a new link." in todo


def test_an_oauth_error_code_stays_as_sent_in_the_translated_sentence(world: World) -> None:
    from functions.launch import launch_sso_callback

    flow_state = _to_sso(world)
    page = _page(
        launch_sso_callback, world, state=flow_state, error="consent_required", lang="pt-BR"
    )
    what, _ = _paragraphs(page)
    assert "A entrada na Microsoft não foi concluída (consent_required)." in what


def test_a_detail_without_a_reason_stays_english_and_is_marked_so(world: World) -> None:
    from functions.launch import launch_callback

    page = _page(launch_callback, world, code="c", lang="es")  # no state: no reason code
    assert page.status_code == 400
    what, _ = _paragraphs(page)
    assert what == '<p class="what" lang="en">The EHR\'s answer has no state.</p>'


def test_every_refusal_with_a_reason_can_be_translated() -> None:
    """Each refusal the launch pages show with a ``reason`` carries its texts, whose English is
    the detail and action API callers get; the catalogs translate every msgid
    (tests/portal/test_translations.py)."""
    from connector_core.service import launch_messages as refusals

    errors = [
        *(
            make(flow)
            for make in (
                refusals.state_expired,
                refusals.state_used,
                refusals.other_browser,
                refusals.state_invalid,
            )
            for flow in refusals.Flow
        ),
        refusals.not_approved(),
        refusals.session_id_missing(),
        refusals.session_id_unfilled(),
        refusals.other_environment("test", "production"),
        refusals.other_environment("production", "test"),
        refusals.untrusted_iss(),
        refusals.no_visit_context(),
        *(refusals.ehr_refused(code) for code in [*refusals.EHR_ERROR_CODES, "other"]),
        refusals.microsoft_signin_refused("interaction_required"),
        refusals.waiting_page_expired(cookie_missing=True),
        refusals.ehr_signin_invalid(),
        refusals.ehr_signin_expired(),
        refusals.ehr_signin_used(),
        refusals.ehr_signin_refused("access_denied"),
    ]
    for error in errors:
        assert error.texts is not None and error.extra["reason"]
        message, action = error.texts
        assert str(message) == error.detail
        assert action is not None and str(action) == error.extra["action"]
