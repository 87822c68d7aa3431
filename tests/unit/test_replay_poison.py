"""What ``devtools.replay_poison`` puts back: the events without their poison note, retry
counters reset (or kept), a body kept as it came when it could not be read; and the reasons it
lists. (Moving messages between real queues: tests/e2e/presence/test_presence_operations.py.)"""

from __future__ import annotations

import base64
import json

from devtools.replay_poison import _prepare, _reason

NOTE = {
    "reason": "retries_exhausted",
    "detail": "The EHR answered 503 to the AuditEvent.",
    "status": 503,
    "code": None,
    "correlation_id": "c0ffee",
    "at": "2026-03-01T10:00:00Z",
}


def _b64(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return base64.b64encode(text.encode()).decode()


def test_a_poisoned_batch_goes_back_without_its_note_and_with_fresh_counters() -> None:
    body = {
        "v": 1,
        "items": [{"attempt": 6, "id": "a"}, {"attempt": 2, "id": "b"}],
        "poisoned": NOTE,
    }
    back = json.loads(base64.b64decode(_prepare(_b64(body), reset_attempts=True)))
    assert "poisoned" not in back and [i["attempt"] for i in back["items"]] == [0, 0]
    kept = json.loads(base64.b64decode(_prepare(_b64(body), reset_attempts=False)))
    assert "poisoned" not in kept and [i["attempt"] for i in kept["items"]] == [6, 2]
    assert _reason(_b64(body)) == "retries_exhausted 503 -"


def test_a_body_that_could_not_be_read_goes_back_as_it_came() -> None:
    wrapped = {"v": 1, "poisoned": {**NOTE, "reason": "malformed"}, "raw": "{not json"}
    assert base64.b64decode(_prepare(_b64(wrapped), reset_attempts=True)) == b"{not json"
    assert _reason(_b64(wrapped)).startswith("malformed")


def test_a_message_the_host_moved_itself_is_moved_unchanged() -> None:
    plain = _b64({"v": 1, "kind": "call", "attempt": 0})
    assert _prepare(plain, reset_attempts=True) == plain
    assert _reason(plain) == "-"
    assert _prepare("not base64 and not json!", reset_attempts=True) == "not base64 and not json!"
