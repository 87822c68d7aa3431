"""The Teams stand-in's meeting page says who is who: each participant's part (organizer, staff,
guest) and, for staff, their persona (clinician, interpreter)."""

from __future__ import annotations

import html

import httpx

from devtools.sandbox import Sandbox, seed
from tests.integration.sandbox_entra_graph.test_graph import _clinician, _create_meeting


def test_the_meeting_page_labels_organizer_staff_and_guest(
    sandbox: Sandbox, contoso_graph: httpx.Client, contoso: str
) -> None:
    meeting = _create_meeting(contoso_graph, _clinician(sandbox, contoso))
    graph = sandbox.graph
    organizer = graph.join(meeting["id"], "organizer")
    interpreter = sandbox.entra.user_for_practitioner(seed.INTERPRETER_ID)
    graph.join(meeting["id"], "staff", oid=interpreter.oid)
    guest = graph.join(meeting["id"], "guest", display_name="Pat Guest")
    graph.admit(meeting["id"], guest)
    base = f"{sandbox.graph_url}/sandbox/meetings/{meeting['id']}"
    with httpx.Client(timeout=10) as browser:
        page = html.unescape(browser.get(base, params={"participant": organizer}).text)
        join = html.unescape(browser.get(meeting["joinWebUrl"]).text)
    assert "You are " in page and "organizer, clinician: their launch created the meeting" in page
    # in the roster or, for staff outside the organizer's bypass, in the lobby list
    assert f'{interpreter.display_name} <span class="who">(staff, interpreter:' in page
    assert 'Pat Guest <span class="who">(guest: a patient or family member' in page
    assert page.count("(you)") == 1
    assert f"{interpreter.display_name} (interpreter)" in join  # the staff picker's persona
